"""A row waiting for the model, as both runners (the batcher and the slot runner) keep it."""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from worker.contract import GenerationOptions
from worker.engine.base import CaptionOutput, Lane, PreparedInput, RunGuard


@dataclass(eq=False)  # identity, not field equality: fields hold tensors
class PendingRow:
    """One submitted row: its input, deadline, future, crash guard and lane."""

    item: PreparedInput
    deadline: float
    future: Future[CaptionOutput]
    arrived: float = field(default_factory=time.monotonic)
    guard: RunGuard | None = None
    lane: Lane = "interactive"

    @property
    def suspect(self) -> bool:
        return self.guard is not None and self.guard.suspect

    # The policy's view of a row (worker.batching.policy.Row).
    @property
    def prompt_tokens(self) -> int:
        return self.item.prompt_tokens

    @property
    def max_new_tokens(self) -> int:
        return self.item.max_new_tokens

    @property
    def options(self) -> GenerationOptions:
        return self.item.options


def fail_row(entry: PendingRow, exc: BaseException) -> None:
    """Fail a row's future unless it is already done."""
    # The task thread may cancel a still-pending future at its deadline; never let that
    # race kill the batcher thread.
    with contextlib.suppress(InvalidStateError):
        if not entry.future.done():
            entry.future.set_exception(exc)
