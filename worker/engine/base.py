"""The engine interface: what the service, the batching layer and the lifecycle rely on.

Two roles meet here. A ``CaptionEngine`` owns a loaded model: it turns an image and a
prompt into a ``PreparedInput`` (any thread) and reports who it is. A ``RowRunner`` owns
the model thread: task threads hand it prepared rows and wait on a future per row. Today's
runner is the whole-batch ``Batcher`` driving a ``BatchEngine`` (one ``generate`` per
batch); a slot engine that admits rows between decode steps implements ``RowRunner``
itself, and the service does not change.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from worker.contract import GenerationOptions
from worker.engine.catalogue import ResolvedModel

if TYPE_CHECKING:
    from PIL import Image

FinishReason = Literal["stop", "length", "timeout", "repetition"]
#: Who is waiting for a row: a caller waiting on one caption (``interactive``), or a bulk
#: run's image (``bulk``). Runners take interactive rows first (docs/batching.md, Lanes).
Lane = Literal["interactive", "bulk"]
PATCH_PIXELS = 32 * 32  # Qwen3-VL: one image token per 32x32 pixels after the 2x2 merge


@dataclass
class PreparedInput:
    """One task's model input: tokenised prompt and preprocessed image, one row."""

    tensors: dict[str, Any]  # one row each; sequence tensors are (1, prompt_tokens)
    prompt_tokens: int
    image_size: tuple[int, int]  # (width, height) the model sees
    max_new_tokens: int
    options: GenerationOptions


@dataclass
class CaptionOutput:
    """One finished row."""

    text: str
    prompt_tokens: int
    generated_tokens: int
    finish_reason: FinishReason
    seconds: float  # time in the model for the call (or steps) that produced this row
    batch_size: int  # rows that shared the model with this one


@dataclass
class ModelInfo:
    """What results report about the model that served them."""

    resolved: ResolvedModel
    device: str
    provenance: dict[str, Any] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.resolved.name


class CaptionEngine(Protocol):
    """A loaded model that prepares inputs and answers a warm-up caption."""

    @property
    def info(self) -> ModelInfo: ...

    @property
    def oom_errors(self) -> tuple[type[BaseException], ...]:
        """Exceptions that mean "this work does not fit in device memory"."""
        ...

    def release_memory(self) -> None:
        """Return cached device memory after an out-of-memory."""

    def prepare(
        self,
        image: Image.Image,
        prompt: str,
        *,
        max_new_tokens: int,
        options: GenerationOptions,
        max_pixels: int,
        min_pixels: int,
    ) -> PreparedInput:
        """Tokenise the prompt and preprocess the image for one row (any thread)."""
        ...

    def warm_up(self) -> CaptionOutput:
        """Caption one small image, so readiness means the model really answers."""
        ...


class BatchEngine(CaptionEngine, Protocol):
    """An engine that captions a whole batch in one call (the batcher's model)."""

    def generate(
        self, batch: Sequence[PreparedInput], deadlines: Sequence[float] | None = None
    ) -> list[CaptionOutput]:
        """Caption rows sharing generation options; rows past their deadline stop early."""
        ...


class RunGuard(Protocol):
    """Told when a task's row enters and leaves the model (crash accounting)."""

    suspect: bool  # an earlier model call with this task in it never returned

    def enter(self) -> None: ...

    def exit(self) -> None: ...


class RowRunner(Protocol):
    """The model thread's front door: rows in from task threads, one future per row out."""

    #: ``time.monotonic()`` when the model call in progress began; None while idle.
    busy_since: float | None

    def start(self) -> None: ...

    def stop(self, timeout: float | None = None) -> None:
        """Finish what was submitted, then stop the model thread."""

    def is_alive(self) -> bool:
        """Whether the model thread is running."""
        ...

    def expect(self, lane: Lane = "interactive") -> AbstractContextManager[None]:
        """Mark a row of ``lane`` as on its way (downloading, preparing) so a forming batch
        waits for it (an interactive row is never held for bulk rows on their way)."""
        ...

    def submit(
        self,
        item: PreparedInput,
        deadline: float,
        guard: RunGuard | None = None,
        lane: Lane = "interactive",
    ) -> Future[CaptionOutput]:
        """Queue one prepared row; the future resolves to its caption or a typed error.

        Interactive rows are taken before bulk rows whenever the model takes rows.
        """
        ...


#: CUDA's sticky errors, as their messages read (cudaGetErrorString): after one of these the
#: context is corrupted and every later call in the process fails.
STICKY_DEVICE_ERRORS = (
    "illegal memory access",  # cudaErrorIllegalAddress
    "device-side assert",  # cudaErrorAssert
    "unspecified launch failure",  # cudaErrorLaunchFailure
    "illegal instruction",  # cudaErrorIllegalInstruction
    "misaligned address",  # cudaErrorMisalignedAddress
    "invalid program counter",  # cudaErrorInvalidPc
    "hardware stack error",  # cudaErrorHardwareStackError
    "uncorrectable ECC error",  # cudaErrorECCUncorrectable
    "the launch timed out",  # cudaErrorLaunchTimeout
)


def device_failed(exc: BaseException) -> bool:
    """Whether ``exc`` leaves the accelerator unusable for the rest of the process.

    Only CUDA's sticky errors do (an illegal address, a device-side assert, a launch
    failure, an uncorrectable ECC error): failing the rows of this call and carrying on
    would fail every task the worker takes from then on. Other CUDA errors (out of memory,
    a cuBLAS allocation failure, an invalid launch configuration) fail their call only, and
    stay the rows' own. torch raises both kinds as ``AcceleratorError`` (older releases: a
    ``RuntimeError``), so the message decides.
    """
    if not isinstance(exc, RuntimeError):
        return False
    message = str(exc)
    return any(sticky in message for sticky in STICKY_DEVICE_ERRORS)
