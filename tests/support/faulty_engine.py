"""A real engine with faults on demand, for fault-injection tests of real worker processes.

Set ``CAPTION_ENGINE_FACTORY=tests.support.faulty_engine:load_faulty_engine`` (with the
repository root on PYTHONPATH). The tiny model loads through the production path; a task
triggers a fault by putting a marker in its prompt:

- ``[slow]``: every decode step sleeps ``FAULT_STEP_DELAY_S`` (default 0.5) seconds; the
  per-row deadline still applies, as it would to a slow GPU.
- ``[hang]``: the generate call blocks for an hour, ignoring deadlines (a stuck kernel).
- ``[kill]``: the process SIGKILLs itself inside generate (a crash in native code).
- ``[device-error]``: generate raises ``torch.AcceleratorError`` as CUDA does after an
  illegal memory access, and so does every model call after it (the error is sticky).

``FAULT_OOM_ABOVE=N`` makes every generate call with more than N rows raise
``torch.OutOfMemoryError``, as CUDA does when a batch does not fit.

With ``CAPTION_ENGINE=slots`` the same markers act on the slot engine: ``[kill]``,
``[hang]`` and ``[device-error]`` when the row is prefilled, ``[slow]`` on every decode step
while the row is live, and ``FAULT_OOM_ABOVE`` on prefills of more rows.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from typing import Any

from worker.engine.base import CaptionEngine, CaptionOutput, FinishReason, PreparedInput
from worker.engine.hf_generate import GenerateEngine
from worker.engine.loading import load_model
from worker.engine.repetition import RepetitionGuard
from worker.engine.slot_engine import SlotEngine, _Row
from worker.settings import Settings

MARKERS = ("[slow]", "[hang]", "[kill]", "[device-error]")


class _Device:
    """The injected device state: broken for good once a ``[device-error]`` row ran."""

    broken = False

    @classmethod
    def check(cls, found: set[str]) -> None:
        import torch

        cls.broken = cls.broken or "[device-error]" in found
        if cls.broken:
            raise torch.AcceleratorError(
                "CUDA error: an illegal memory access was encountered (injected)"
            )


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
        _Device.check(found)
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


class FaultySlotEngine(SlotEngine):
    """SlotEngine whose prefill and decode steps misbehave for rows that ask for it."""

    base: FaultyEngine

    def admit_many(self, rows: list[tuple[int, PreparedInput]]) -> list[CaptionOutput | None]:
        import torch

        oom_above = int(os.environ.get("FAULT_OOM_ABOVE", "0"))
        if oom_above and len(rows) > oom_above:
            raise torch.OutOfMemoryError(f"injected: prefill of {len(rows)} > {oom_above}")
        found = self.base._found([item for _, item in rows])
        if "[kill]" in found:
            os.kill(os.getpid(), signal.SIGKILL)
        if "[hang]" in found:
            time.sleep(3600)
        _Device.check(found)
        return super().admit_many(rows)

    def step(self) -> list[tuple[int, CaptionOutput]]:
        _Device.check(set())
        if "[slow]" in self.base._found([row.item for row in self._rows.values()]):
            time.sleep(float(os.environ.get("FAULT_STEP_DELAY_S", "0.5")))
        return super().step()

    def _output(
        self, row: _Row, kept: list[int], generated: int, reason: FinishReason
    ) -> CaptionOutput:
        self.base.markers.pop(id(row.item), None)  # ids are reused once a row is gone
        return super()._output(row, kept, generated, reason)


def load_faulty_engine(settings: Settings) -> CaptionEngine:
    """The production model, processor and provenance (``load_model``) behind the faulty
    engine, with the repetition guard the worker's settings ask for; inside a faulty slot
    engine when ``CAPTION_ENGINE=slots``."""
    guard = RepetitionGuard(settings.repetition_span, settings.repetition_max_cycle)
    engine = FaultyEngine(*load_model(settings), repetition=guard)
    if settings.engine == "slots":
        return FaultySlotEngine(engine, settings.slot_count, settings.slot_capacity)
    return engine
