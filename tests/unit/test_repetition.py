"""The repetition guard's rule, as a pure function of a row's tokens."""

from __future__ import annotations

import pytest

from worker.engine.repetition import RepetitionGuard


@pytest.mark.parametrize("cycle", [[5], [5, 6], [1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2]])
def test_a_short_cycle_filling_the_span_is_a_loop(cycle: list[int]) -> None:
    guard = RepetitionGuard(span=16, max_cycle=8)
    tokens = [100, 101, 102, *(cycle * 16)[:16]]
    assert guard.repeats(tokens)


def test_a_cycle_longer_than_max_cycle_is_not_a_loop() -> None:
    tokens = list(range(9)) * 4
    assert not RepetitionGuard(span=27, max_cycle=8).repeats(tokens)
    assert RepetitionGuard(span=27, max_cycle=9).repeats(tokens)


def test_the_loop_must_cover_the_whole_span() -> None:
    guard = RepetitionGuard(span=12, max_cycle=4)
    tokens = [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]  # 11 tokens: not yet a full span
    assert not guard.repeats(tokens)
    assert guard.repeats([*tokens, 7])
    assert not guard.repeats([1, 2, 3, *([4, 5] * 5), 6])  # broken by the last token


def test_ordinary_text_and_a_disabled_guard_never_stop() -> None:
    words = [11, 42, 7, 42, 93, 11, 5, 61, 42, 8, 17, 11, 29, 3, 42, 70]
    assert not RepetitionGuard(span=16, max_cycle=8).repeats(words)
    assert not RepetitionGuard(span=0, max_cycle=8).repeats([1] * 100)
