"""The repetition guard: a caption stuck repeating a short cycle of tokens stops early.

A looping caption (``"a cat, a cat, a cat, ..."``) runs to ``max_new_tokens`` and wastes the
GPU and the producer's time. A row whose last ``span`` tokens are periodic with a period of
at most ``max_cycle`` tokens ends with finish reason ``repetition``; the text keeps what was
generated up to that point. ``span == 0`` turns the guard off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RepetitionGuard:
    """When a row counts as stuck in a loop."""

    span: int = 48  # tokens that must all follow the cycle; 0 disables the guard
    max_cycle: int = 8  # longest cycle, in tokens, that counts as a loop

    def repeats(self, tokens: Sequence[int]) -> bool:
        """Whether the last ``span`` tokens repeat one cycle of at most ``max_cycle`` tokens."""
        if self.span <= 0 or len(tokens) < self.span:
            return False
        window = tokens[-self.span :]
        return any(
            all(window[i] == window[i - period] for i in range(period, self.span))
            for period in range(1, min(self.max_cycle, self.span // 2) + 1)
        )
