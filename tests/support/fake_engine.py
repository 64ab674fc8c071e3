"""A fake BatchEngine: no model, tiny tensors, and a caption per row that names the row.

Each prepared row's token ids all equal its ``tag``; the fake answers every row with
``caption <tag>``, so a task that receives a neighbour's caption, or a batch that mixes what
must not be mixed, shows up directly. ``load_fake_engine`` and ``load_failing_engine`` are
``CAPTION_ENGINE_FACTORY`` targets for lifecycle tests.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from worker.contract import GenerationOptions
from worker.engine.base import CaptionOutput, ModelInfo, PreparedInput
from worker.engine.catalogue import ResolvedModel
from worker.errors import ModelLoadError
from worker.settings import Settings

GREEDY = GenerationOptions()


def item(
    tag: int,
    *,
    prompt_tokens: int = 40,
    max_new_tokens: int = 16,
    options: GenerationOptions = GREEDY,
) -> PreparedInput:
    """A prepared input whose token ids all equal ``tag``, so the fake can tell rows apart."""
    return PreparedInput(
        tensors={
            "input_ids": torch.full((1, prompt_tokens), tag, dtype=torch.long),
            "attention_mask": torch.ones((1, prompt_tokens), dtype=torch.long),
        },
        prompt_tokens=prompt_tokens,
        image_size=(64, 64),
        max_new_tokens=max_new_tokens,
        options=options,
    )


def tag_of(entry: PreparedInput) -> int:
    return int(entry.tensors["input_ids"][0, 0])


class FakeEngine:
    """A BatchEngine that records batches and captions each row with its own tag."""

    def __init__(
        self,
        *,
        oom_above: int | None = None,
        oom_tags: Sequence[int] = (),
        poison_tags: Sequence[int] = (),
        timeout_tags: Sequence[int] = (),
        gate: threading.Event | None = None,
    ) -> None:
        self.oom_above = oom_above
        self.oom_tags = set(oom_tags)
        self.poison_tags = set(poison_tags)
        self.timeout_tags = set(timeout_tags)
        self.gate = gate
        self.calls: list[list[PreparedInput]] = []
        self.deadlines: list[list[float] | None] = []
        self.ooms = 0
        self.releases = 0
        self.runner: Any = None  # set by a test to record the runner's busy_since
        self.busy_since_seen: list[float | None] = []
        self._info = ModelInfo(ResolvedModel("fake-model", "fake-model", False, None), "cpu")

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def oom_errors(self) -> tuple[type[BaseException], ...]:
        return (torch.OutOfMemoryError,)

    def release_memory(self) -> None:
        self.releases += 1

    def prepare(
        self,
        image: Any,
        prompt: str,
        *,
        max_new_tokens: int,
        options: GenerationOptions,
        max_pixels: int,
        min_pixels: int,
    ) -> PreparedInput:
        return item(len(prompt), max_new_tokens=max_new_tokens, options=options)

    def warm_up(self) -> CaptionOutput:
        return self.generate([item(0, max_new_tokens=1)])[0]

    def generate(
        self, batch: Sequence[PreparedInput], deadlines: Sequence[float] | None = None
    ) -> list[CaptionOutput]:
        self.calls.append(list(batch))
        self.deadlines.append(None if deadlines is None else list(deadlines))
        if self.runner is not None:
            self.busy_since_seen.append(self.runner.busy_since)
        if self.gate is not None:
            assert self.gate.wait(5), "the test never opened the gate"
        tags = {tag_of(entry) for entry in batch}
        if (self.oom_above is not None and len(batch) > self.oom_above) or tags & self.oom_tags:
            self.ooms += 1
            raise torch.OutOfMemoryError(f"fake: {len(batch)} rows do not fit")
        if tags & self.poison_tags:
            raise ValueError("fake: a poisoned row broke the whole batch")
        return [
            CaptionOutput(
                text=f"caption {tag_of(entry)}",
                prompt_tokens=entry.prompt_tokens,
                generated_tokens=entry.max_new_tokens,
                finish_reason="timeout" if tag_of(entry) in self.timeout_tags else "length",
                seconds=0.01,
                batch_size=len(batch),
            )
            for entry in batch
        ]

    def tag_batches(self) -> list[list[int]]:
        return [[tag_of(entry) for entry in call] for call in self.calls]

    def sizes(self) -> list[int]:
        return [len(call) for call in self.calls]


#: The engines the factories below returned, newest last (lifecycle tests inspect them).
LOADED: list[FakeEngine] = []


def load_fake_engine(settings: Settings) -> FakeEngine:
    """A ``CAPTION_ENGINE_FACTORY`` that loads nothing."""
    engine = FakeEngine()
    LOADED.append(engine)
    return engine


def load_failing_engine(settings: Settings) -> FakeEngine:
    """A ``CAPTION_ENGINE_FACTORY`` whose model never loads."""
    raise ModelLoadError(f"fake: cannot load {settings.model}")
