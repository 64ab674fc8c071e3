"""The batching policy as pure functions: when to start a batch, and which rows go in it.

Kept apart from the thread that applies it, so the rules can be read and tested without
clocks, locks or a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from worker.contract import GenerationOptions


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


R = TypeVar("R", bound=Row)


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
    """The oldest row plus the compatible rows closest to it in prompt length.

    ``rows`` are live and oldest first. Compatible means equal generation options, within
    ``pad_ratio`` of each other's prompt length and inside the padded-token budget. A
    suspect row (an earlier model call with it never returned) always runs alone.
    """
    if not rows:
        return []
    first = rows[0]
    if first.suspect:
        return [first]  # it may be what killed the last worker: never take others along
    same = [r for r in rows[1:] if r.options == first.options and not r.suspect]
    same.sort(key=lambda r: (abs(r.prompt_tokens - first.prompt_tokens), r.arrived))
    chosen = [first]
    shortest = longest = first.prompt_tokens
    most_new = first.max_new_tokens
    for row in same:
        if len(chosen) >= cap:
            break
        lo = min(shortest, row.prompt_tokens)
        hi = max(longest, row.prompt_tokens)
        new = max(most_new, row.max_new_tokens)
        if hi > limits.pad_ratio * lo:
            continue  # this bucket would waste too much on padding
        if (hi + new) * (len(chosen) + 1) > limits.token_budget:
            continue
        chosen.append(row)
        shortest, longest, most_new = lo, hi, new
    return chosen
