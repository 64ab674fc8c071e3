"""The batching policy as pure functions: which waiting rows share a batch, and when it starts.

No threads, clocks or model: rows are plain records, time is a number. ``drain`` applies
``select_batch`` the way the batcher does (take a batch, drop it from the waiting rows,
repeat), so the batches a burst becomes can be read off directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from worker.batching.policy import (
    BatchLimits,
    lane_to_serve,
    lanes_first,
    select_batch,
    wait_before_batch,
)
from worker.contract import GenerationOptions
from worker.engine.base import Lane
from worker.runtime.bootstrap import batch_limits
from worker.settings import Settings

GREEDY = GenerationOptions()
SAMPLED = GenerationOptions(do_sample=True, temperature=0.7)
SAMPLED_SEEDED = GenerationOptions(do_sample=True, temperature=0.7, seed=1)


@dataclass(frozen=True)
class Row:
    tag: int
    prompt_tokens: int = 40
    max_new_tokens: int = 16
    options: GenerationOptions = GREEDY
    suspect: bool = False
    lane: Lane = "interactive"

    @property
    def arrived(self) -> float:
        return float(self.tag)  # rows arrive in tag order


def rows(count: int, **fields: object) -> list[Row]:
    return [Row(tag, **fields) for tag in range(count)]  # type: ignore[arg-type]


def drain(waiting: Sequence[Row], cap: int = 32, **limits: float) -> list[list[int]]:
    """The batches, as tags, that a burst of ``waiting`` rows becomes."""
    settings = BatchLimits(max_batch=cap, **limits)  # type: ignore[arg-type]
    left, batches = list(waiting), []
    while left:
        batch = select_batch(left, cap, settings)
        assert batch and batch[0] is left[0], "the oldest row always goes first"
        batches.append([row.tag for row in batch])
        left = [row for row in left if row not in batch]
    return batches


# --- select_batch ------------------------------------------------------------------------------


def test_no_rows_no_batch() -> None:
    assert select_batch([], 4, BatchLimits()) == []


def test_compatible_rows_fill_batches_up_to_the_cap_oldest_first() -> None:
    assert drain(rows(10), cap=4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_different_generation_options_never_share_a_batch() -> None:
    options = [GREEDY, SAMPLED, GREEDY, SAMPLED_SEEDED, SAMPLED, GREEDY, SAMPLED_SEEDED]
    batches = drain([Row(t, options=o) for t, o in enumerate(options)])
    for batch in batches:
        assert len({options[t] for t in batch}) == 1, batches
    # Everything was waiting together, so each option set is exactly one batch.
    assert sorted(map(sorted, batches)) == [[0, 2, 5], [1, 4], [3, 6]]


def test_prompts_of_very_different_length_go_to_different_batches() -> None:
    lengths = [40, 400, 44, 380, 60, 300, 75]
    batches = drain([Row(t, prompt_tokens=n) for t, n in enumerate(lengths)], pad_ratio=2.0)
    for batch in batches:
        assert max(lengths[t] for t in batch) <= 2.0 * min(lengths[t] for t in batch), batches
    assert sorted(map(sorted, batches)) == [[0, 2, 4, 6], [1, 3, 5]]


def test_a_full_batch_takes_the_prompt_lengths_closest_to_the_oldest_task() -> None:
    lengths = [50, 30, 80, 52, 26, 55]
    batches = drain([Row(t, prompt_tokens=n) for t, n in enumerate(lengths)], cap=3)
    assert sorted(batches[0]) == [0, 3, 5]  # 50 with 52 and 55
    assert sorted(t for batch in batches for t in batch) == list(range(len(lengths)))


def test_equally_close_prompt_lengths_go_oldest_first() -> None:
    waiting = [Row(0, prompt_tokens=50), Row(1, prompt_tokens=54), Row(2, prompt_tokens=46)]
    assert drain(waiting, cap=2) == [[0, 1], [2]]


def test_token_budget_caps_the_batch_size() -> None:
    # (prompt + new) * rows must stay within the budget: 128 tokens a row, 4 rows in 512.
    waiting = rows(10, prompt_tokens=100, max_new_tokens=28)
    batches = drain(waiting, token_budget=512)
    assert [len(batch) for batch in batches] == [4, 4, 2]


def test_token_budget_counts_the_longest_prompt_and_the_most_new_tokens() -> None:
    waiting = [Row(0, prompt_tokens=100, max_new_tokens=10), Row(1, prompt_tokens=60)]
    waiting.append(Row(2, prompt_tokens=100, max_new_tokens=200))
    # Row 2 is the closest in length, but rows 0 and 2 need (100 + 200) * 2 = 600 tokens;
    # rows 0 and 1 need (100 + 16) * 2 = 232.
    assert drain(waiting, token_budget=599) == [[0, 1], [2]]
    assert drain(waiting, token_budget=600) == [[0, 2], [1]]


def test_a_suspect_row_runs_alone_and_is_never_taken_along() -> None:
    waiting = [Row(0), Row(1, suspect=True), Row(2), Row(3, suspect=True), Row(4)]
    assert drain(waiting) == [[0, 2, 4], [1], [3]]
    assert drain([Row(0, suspect=True), Row(1), Row(2)]) == [[0], [1, 2]]


# --- wait_before_batch -------------------------------------------------------------------------

LIMITS = BatchLimits(max_batch=8, wait_s=0.5, linger_s=0.025)


def pause(
    *, now: float, oldest: float = 0.0, last: float = 0.0, preparing: int = 0, waiting: int = 1
) -> float | None:
    return wait_before_batch(
        now=now,
        oldest=oldest,
        last_arrival=last,
        preparing=preparing,
        waiting=waiting,
        cap=LIMITS.max_batch,
        limits=LIMITS,
    )


def test_a_lone_row_starts_once_the_burst_is_quiet() -> None:
    assert pause(now=0.030, last=0.0) is None  # linger passed, nothing preparing
    assert pause(now=0.010, last=0.0) == pytest.approx(0.015)  # still inside the linger


def test_a_row_on_its_way_holds_the_batch_until_wait_s() -> None:
    assert pause(now=0.2, preparing=1) == pytest.approx(0.3)  # quiet, but a task is preparing
    assert pause(now=0.5, preparing=1) is None  # the oldest row has waited wait_s
    assert pause(now=0.9, preparing=3, last=0.89) is None


def test_the_linger_never_holds_the_oldest_row_past_wait_s() -> None:
    assert pause(now=0.49, last=0.48) == pytest.approx(0.01)


def test_a_full_batch_starts_at_once() -> None:
    assert pause(now=0.0, preparing=5, waiting=LIMITS.max_batch) is None
    assert pause(now=0.0, preparing=5, waiting=LIMITS.max_batch + 3) is None
    lowered = wait_before_batch(
        now=0.0, oldest=0.0, last_arrival=0.0, preparing=5, waiting=2, cap=2, limits=LIMITS
    )
    assert lowered is None  # the cap after an out-of-memory counts, not max_batch


def test_settings_defaults_are_the_policy_defaults() -> None:
    names = (
        "max_batch",
        "batch_wait_ms",
        "batch_linger_ms",
        "batch_token_budget",
        "batch_pad_ratio",
    )
    defaults = {name: Settings.model_fields[name].default for name in names}
    assert batch_limits(Settings(**defaults)) == BatchLimits()
    assert batch_limits(Settings(batch_wait_ms=250, batch_linger_ms=5)) == BatchLimits(
        wait_s=0.25, linger_s=0.005
    )


# --- lanes -------------------------------------------------------------------------------------


def bulk(tag: int, **fields: object) -> Row:
    return Row(tag, lane="bulk", **fields)  # type: ignore[arg-type]


def drain_lanes(waiting: Sequence[Row], cap: int = 32, **limits: float) -> list[list[int]]:
    """``drain`` for mixed lanes: the head is the oldest row of the lane served first."""
    settings = BatchLimits(max_batch=cap, **limits)  # type: ignore[arg-type]
    left, batches = list(waiting), []
    while left:
        batch = select_batch(left, cap, settings)
        assert batch and batch[0] is lanes_first(left)[0]
        batches.append([row.tag for row in batch])
        left = [row for row in left if row not in batch]
    return batches


def test_an_interactive_row_heads_the_next_batch_behind_a_bulk_backlog() -> None:
    waiting = [bulk(t) for t in range(40)] + [Row(40)]
    batch = select_batch(waiting, 8, BatchLimits(max_batch=8))
    assert [row.tag for row in batch] == [40, 0, 1, 2, 3, 4, 5, 6]  # bulk rows only fill


def test_interactive_rows_fill_the_batch_before_any_bulk_row() -> None:
    # Sixteen rows, bulk and interactive alternating, bulk oldest: the batch is interactive.
    waiting = [bulk(t) if t % 2 == 0 else Row(t) for t in range(16)]
    assert drain_lanes(waiting, cap=8) == [list(range(1, 16, 2)), list(range(0, 16, 2))]


def test_interactive_rows_come_first_even_when_bulk_rows_are_closer_in_length() -> None:
    waiting = [bulk(0, prompt_tokens=50), bulk(1, prompt_tokens=50), Row(2, prompt_tokens=50)]
    waiting += [Row(3, prompt_tokens=80), Row(4, prompt_tokens=42)]
    assert drain_lanes(waiting, cap=3) == [[2, 4, 3], [0, 1]]


def test_bulk_filler_never_makes_an_interactive_batch_decode_longer() -> None:
    waiting = [bulk(0, max_new_tokens=64), bulk(1, max_new_tokens=8), bulk(2, max_new_tokens=64)]
    waiting += [Row(3, max_new_tokens=8), bulk(4, max_new_tokens=4)]
    assert drain_lanes(waiting) == [[3, 1, 4], [0, 2]]


def test_bulk_rows_batch_as_before_when_no_interactive_row_waits() -> None:
    # No starvation without interactive load: bulk rows drain oldest first, full batches.
    assert drain_lanes([bulk(t) for t in range(10)], cap=4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert drain_lanes([bulk(t, max_new_tokens=8 * (t + 1)) for t in range(3)]) == [[0, 1, 2]]


def test_lanes_keep_the_other_batch_rules() -> None:
    waiting = [bulk(0), Row(1, options=SAMPLED), Row(2), bulk(3, prompt_tokens=400)]
    waiting += [bulk(4, options=SAMPLED), Row(5, prompt_tokens=400)]
    # Options and pad ratio still split batches; the lanes only order them.
    assert drain_lanes(waiting) == [[1, 4], [2, 0], [5, 3]]


def test_a_suspect_row_still_runs_alone_in_either_lane() -> None:
    waiting = [bulk(0), Row(1, suspect=True), Row(2), bulk(3)]
    assert drain_lanes(waiting) == [[1], [2, 0, 3]]
    waiting = [bulk(0, suspect=True), bulk(1), Row(2), bulk(3)]
    assert drain_lanes(waiting) == [[2, 1, 3], [0]]


def test_lane_order_helpers() -> None:
    waiting = [bulk(0), Row(1), bulk(2), Row(3)]
    assert [row.tag for row in lanes_first(waiting)] == [1, 3, 0, 2]
    assert lane_to_serve(waiting) == "interactive"
    assert lane_to_serve([bulk(0)]) == "bulk"
    assert lanes_first(rows(3)) == rows(3)  # all interactive: arrival order unchanged
