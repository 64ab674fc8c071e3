"""The batching policy as pure functions: when to start a batch, and which rows go in it.

Kept apart from the thread that applies it, so the rules can be read and tested without
clocks, locks or a model.

Lanes: every row is ``interactive`` (someone waits on this one caption) or ``bulk`` (an
image of a bulk run). Interactive rows are always taken first: a batch's head is the oldest
interactive row if any waits, else the oldest bulk row, and the batch is filled with
compatible interactive rows before any bulk row. Bulk rows run whenever no interactive row
waits, so they starve only under interactive load that fills the model by itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from worker.contract import GenerationOptions
from worker.engine.base import Lane


@dataclass(frozen=True)
class BatchLimits:
    """How large a batch may grow, and how long it may wait to fill."""

    max_batch: int = 32
    wait_s: float = 0.5  # longest the oldest row is held while a batch fills
    linger_s: float = 0.025  # quiet time after the last arrival that ends a burst
    token_budget: int = 262_144  # padded (prompt + new) tokens per batch
    pad_ratio: float = 2.0  # longest prompt / shortest prompt within a batch


class Row(Protocol):
    """What the policy reads of a waiting row."""

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def max_new_tokens(self) -> int: ...

    @property
    def options(self) -> GenerationOptions: ...

    @property
    def arrived(self) -> float: ...

    @property
    def suspect(self) -> bool: ...

    @property
    def lane(self) -> Lane: ...


R = TypeVar("R", bound=Row)


def lane_to_serve(rows: Sequence[Row]) -> Lane:
    """The lane the next batch is formed for: interactive while any interactive row waits."""
    return "interactive" if any(r.lane == "interactive" for r in rows) else "bulk"


def lanes_first(rows: Sequence[R]) -> list[R]:
    """``rows`` (oldest first) in the order they are taken: interactive rows, then bulk rows,
    each lane oldest first."""
    return [r for r in rows if r.lane == "interactive"] + [
        r for r in rows if r.lane != "interactive"
    ]


def wait_before_batch(
    *,
    now: float,
    oldest: float,
    last_arrival: float,
    preparing: int,
    waiting: int,
    cap: int,
    limits: BatchLimits,
) -> float | None:
    """Seconds to keep filling the batch, or None to start it now.

    Wait while more rows are on their way (one still preparing, or a burst that arrived
    within ``linger_s``) and there is room, but never hold the oldest row past ``wait_s``.
    """
    if waiting >= cap:
        return None
    left = oldest + limits.wait_s - now
    quiet = last_arrival + limits.linger_s - now
    if left <= 0 or (preparing == 0 and quiet <= 0):
        return None
    return left if preparing else min(left, quiet)


def select_batch(rows: Sequence[R], cap: int, limits: BatchLimits) -> list[R]:
    """The oldest row of the lane served first plus the compatible rows closest to it in
    prompt length, interactive rows before bulk rows.

    ``rows`` are live and oldest first. The head is the oldest interactive row, or the
    oldest row when none is interactive. Compatible means equal generation options, within
    ``pad_ratio`` of each other's prompt length and inside the padded-token budget. Every
    compatible interactive row is considered before any bulk row, and a bulk row joins an
    interactive batch only if it asks for no more new tokens than the interactive rows do:
    bulk filler never makes an interactive batch decode longer. A suspect row (an earlier
    model call with it never returned) always runs alone.
    """
    if not rows:
        return []
    first = lanes_first(rows)[0]
    if first.suspect:
        return [first]  # it may be what killed the last worker: never take others along
    same = [r for r in rows if r is not first and r.options == first.options and not r.suspect]
    same.sort(
        key=lambda r: (
            r.lane != "interactive",
            abs(r.prompt_tokens - first.prompt_tokens),
            r.arrived,
        )
    )
    served = first.lane
    chosen = [first]
    shortest = longest = first.prompt_tokens
    most_new = first.max_new_tokens
    for row in same:
        if len(chosen) >= cap:
            break
        lo = min(shortest, row.prompt_tokens)
        hi = max(longest, row.prompt_tokens)
        new = max(most_new, row.max_new_tokens)
        if row.lane != served and new > most_new:
            continue  # bulk filler must not hold the interactive rows past their own length
        if hi > limits.pad_ratio * lo:
            continue  # this bucket would waste too much on padding
        if (hi + new) * (len(chosen) + 1) > limits.token_budget:
            continue
        chosen.append(row)
        shortest, longest, most_new = lo, hi, new
    return chosen
