"""A real engine with faults on demand, for fault-injection tests of real worker processes.

Set ``CAPTION_ENGINE_FACTORY=tests.support.faulty_engine:load_faulty_engine`` (with the
repository root on PYTHONPATH). The tiny model loads through the production path; a task
triggers a fault by putting a marker in its prompt:

- ``[slow]``: every decode step sleeps ``FAULT_STEP_DELAY_S`` (default 0.5) seconds; the
  per-row deadline still applies, as it would to a slow GPU.
- ``[hang]``: the generate call blocks for an hour, ignoring deadlines (a stuck kernel).
- ``[kill]``: the process SIGKILLs itself inside generate (a crash in native code).

``FAULT_OOM_ABOVE=N`` makes every generate call with more than N rows raise
``torch.OutOfMemoryError``, as CUDA does when a batch does not fit.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from typing import Any

from worker.engine.base import CaptionOutput, PreparedInput
from worker.engine.hf_generate import GenerateEngine
from worker.engine.loading import load_model
from worker.engine.repetition import RepetitionGuard
from worker.settings import Settings

MARKERS = ("[slow]", "[hang]", "[kill]")


class _SleepEachStep:
    """A logits processor that only sleeps: makes every decode step slow."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        time.sleep(self.seconds)
        return scores


class FaultyEngine(GenerateEngine):
    """GenerateEngine whose generate misbehaves for tasks that ask for it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # GenerateEngine's own arguments
        self.markers: dict[int, str] = {}  # id(prepared row) -> its prompt's marker

    def prepare(self, image: Any, prompt: str, **kwargs: Any) -> PreparedInput:  # type: ignore[override]
        item = super().prepare(image, prompt, **kwargs)
        found = next((m for m in MARKERS if m in prompt), None)
        if found:
            self.markers[id(item)] = found
        return item

    def _found(self, batch: Sequence[PreparedInput]) -> set[str]:
        return {m for item in batch if (m := self.markers.get(id(item))) is not None}

    def generate(
        self, batch: Sequence[PreparedInput], deadlines: Sequence[float] | None = None
    ) -> list[CaptionOutput]:
        import torch

        oom_above = int(os.environ.get("FAULT_OOM_ABOVE", "0"))
        if oom_above and len(batch) > oom_above:
            # The markers stay: the batcher runs these rows again in smaller batches.
            raise torch.OutOfMemoryError(f"injected: batch of {len(batch)} > {oom_above}")
        found = self._found(batch)
        if "[kill]" in found:
            os.kill(os.getpid(), signal.SIGKILL)
        if "[hang]" in found:
            time.sleep(3600)
        try:
            return super().generate(batch, deadlines)
        finally:
            for item in batch:
                self.markers.pop(id(item), None)

    def _generate(self, batch: Sequence[PreparedInput], **kwargs: Any) -> Any:
        if "[slow]" in self._found(batch):
            delay = float(os.environ.get("FAULT_STEP_DELAY_S", "0.5"))
            kwargs["logits_processor"] = [_SleepEachStep(delay)]
        return super()._generate(batch, **kwargs)


def load_faulty_engine(settings: Settings) -> FaultyEngine:
    """The production model, processor and provenance (``load_model``) behind the faulty
    engine, with the repetition guard the worker's settings ask for."""
    guard = RepetitionGuard(settings.repetition_span, settings.repetition_max_cycle)
    return FaultyEngine(*load_model(settings), repetition=guard)
