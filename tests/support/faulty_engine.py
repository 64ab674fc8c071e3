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
from dataclasses import dataclass, field
from typing import Any

from worker.engine import CaptionOutput, Engine, PreparedInput, load_engine
from worker.settings import Settings

MARKERS = ("[slow]", "[hang]", "[kill]")


class _SleepEachStep:
    """A logits processor that only sleeps: makes every decode step slow."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        time.sleep(self.seconds)
        return scores


@dataclass
class FaultyEngine(Engine):
    """Engine whose generate misbehaves for tasks that ask for it."""

    markers: dict[int, str] = field(default_factory=dict)

    def prepare(self, image: Any, prompt: str, **kwargs: Any) -> PreparedInput:  # type: ignore[override]
        item = super().prepare(image, prompt, **kwargs)
        found = next((m for m in MARKERS if m in prompt), None)
        if found:
            self.markers[id(item)] = found
        return item

    def generate(
        self, batch: Sequence[PreparedInput], deadlines: Sequence[float] | None = None
    ) -> list[CaptionOutput]:
        import torch

        oom_above = int(os.environ.get("FAULT_OOM_ABOVE", "0"))
        if oom_above and len(batch) > oom_above:
            raise torch.OutOfMemoryError(f"injected: batch of {len(batch)} > {oom_above}")
        found = {self.markers.pop(id(item), None) for item in batch}
        if "[kill]" in found:
            os.kill(os.getpid(), signal.SIGKILL)
        if "[hang]" in found:
            time.sleep(3600)
        if "[slow]" in found:
            delay = float(os.environ.get("FAULT_STEP_DELAY_S", "0.5"))
            original = self.model.generate

            def slow_generate(*args: Any, **kwargs: Any) -> Any:
                return original(*args, logits_processor=[_SleepEachStep(delay)], **kwargs)

            self.model.generate = slow_generate
            try:
                return super().generate(batch, deadlines)
            finally:
                del self.model.generate
        return super().generate(batch, deadlines)


def load_faulty_engine(settings: Settings) -> Engine:
    """The production loader, wrapped."""
    real = load_engine(settings)
    return FaultyEngine(real.model, real.processor, real.resolved, real.device, real.provenance)
