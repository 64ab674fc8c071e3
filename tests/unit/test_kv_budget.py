"""Sizing the slot engine's KV cache against the memory the weights left."""

from __future__ import annotations

import logging

import pytest

from worker.engine.kv_budget import slots_that_fit
from worker.errors import ModelLoadError

GIB = 2**30
PER_SLOT = GIB // 2  # e.g. 2,560 tokens at 8B shape in bf16: 360 MiB; round numbers here


def test_a_cache_that_fits_or_an_unknown_room_keeps_the_slots() -> None:
    assert slots_that_fit(32, False, PER_SLOT, 16 * GIB, 2560) == 32
    assert slots_that_fit(32, True, PER_SLOT, None, 2560) == 32  # the CPU: nothing to size


def test_the_default_count_shrinks_to_what_fits_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        assert slots_that_fit(32, False, PER_SLOT, 9 * GIB + 1, 2560) == 18
    assert "starting with 18 slots" in caplog.text
    assert "32 slots of 2560 tokens need 16.0 GiB" in caplog.text


def test_an_explicit_count_that_does_not_fit_is_refused_with_the_ways_out() -> None:
    with pytest.raises(ModelLoadError) as refused:
        slots_that_fit(32, True, PER_SLOT, 9 * GIB, 2560)
    message = str(refused.value)
    assert "16.0 GiB" in message and "9.0 GiB is left" in message and "(18 would fit)" in message
    assert "CAPTION_SLOTS" in message and "CAPTION_ENGINE=generate" in message


def test_no_room_for_a_single_slot_is_refused_even_by_default() -> None:
    with pytest.raises(ModelLoadError, match=r"\(0 would fit\)"):
        slots_that_fit(32, False, PER_SLOT, GIB // 4, 2560)
    with pytest.raises(ModelLoadError, match=r"0.0 GiB is left"):
        slots_that_fit(32, False, PER_SLOT, -GIB, 2560)  # the weights took the margin too
