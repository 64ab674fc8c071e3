"""The task contract in types: a parsed request, its generation options, the result.

Producers call ``send_task("caption", kwargs={...})`` from any codebase, so arguments arrive
as plain JSON values. Everything is checked strictly here (no "512" for 512, no unknown
keys) so a bad request fails at once with ``InvalidRequest`` instead of deep in the model.
JSON ``null`` for an optional argument means "not given" (JavaScript producers send it for
unset fields); ``image`` is required and never null.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.errors import InvalidRequest
from worker.settings import Settings

#: The task's registered name; producers send it with ``send_task``.
TASK_NAME = "caption"
#: The bulk shard task's name (``worker.queue.bulk_task``); ``bulk submit`` sends it by name.
SHARD_TASK_NAME = "caption_bulk_shard"
DEFAULT_MAX_NEW_TOKENS = 512


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling options; tasks whose options are equal can share one generate call."""

    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate``; greedy unless sampling was asked for."""
        kwargs: dict[str, Any] = {"do_sample": self.do_sample}
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.do_sample:
            for name in ("temperature", "top_p", "top_k"):
                value = getattr(self, name)
                if value is not None:
                    kwargs[name] = value
        else:
            # Neutralise sampling defaults from the checkpoint's generation_config, which
            # otherwise make transformers warn on every greedy call.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass(frozen=True)
class CaptionRequest:
    """A validated caption task."""

    image: str  # as given: an s3:// URI for tasks, a file path for local captions
    prompt: str
    max_new_tokens: int
    model: str | None
    options: GenerationOptions
    max_pixels: int


class _Kwargs(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    image: str
    prompt: str | None = None
    max_new_tokens: int | None = Field(None, ge=1)
    model: str | None = None
    do_sample: bool | None = None
    temperature: float | None = Field(None, gt=0, le=10)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    seed: int | None = Field(None, ge=0, lt=2**63)
    max_pixels: int | None = Field(None, ge=1_024)


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "kwargs"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown argument {where!r}")
        else:
            parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_request(kwargs: dict[str, Any], settings: Settings) -> CaptionRequest:
    """Validate raw task kwargs, applying the worker's defaults and limits."""
    try:
        raw = _Kwargs.model_validate(kwargs)
    except ValidationError as exc:
        raise InvalidRequest(f"invalid caption request: {_describe(exc)}") from None
    prompt = settings.default_prompt if raw.prompt is None else raw.prompt
    if not prompt.strip():
        raise InvalidRequest("invalid caption request: prompt is empty")
    if len(prompt) > settings.max_prompt_chars:
        raise InvalidRequest(
            f"invalid caption request: prompt has {len(prompt)} characters, "
            f"the limit is {settings.max_prompt_chars}"
        )
    max_new_tokens = raw.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, settings.max_new_tokens_limit)
    if max_new_tokens > settings.max_new_tokens_limit:
        raise InvalidRequest(
            f"invalid caption request: max_new_tokens={max_new_tokens} exceeds "
            f"the limit of {settings.max_new_tokens_limit}"
        )
    max_pixels = settings.max_pixels if raw.max_pixels is None else raw.max_pixels
    if max_pixels > settings.max_pixels:
        raise InvalidRequest(
            f"invalid caption request: max_pixels={max_pixels} exceeds this worker's "
            f"limit of {settings.max_pixels}"
        )
    options = GenerationOptions(
        do_sample=bool(raw.do_sample),
        temperature=raw.temperature,
        top_p=raw.top_p,
        top_k=raw.top_k,
        repetition_penalty=raw.repetition_penalty,
        # A seed only matters when sampling; dropping it keeps greedy tasks batchable.
        seed=raw.seed if raw.do_sample else None,
    )
    return CaptionRequest(
        image=raw.image,
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        model=raw.model,
        options=options,
        max_pixels=max(max_pixels, settings.min_pixels),
    )


@dataclass(frozen=True)
class CaptionResult:
    """A successful task's result; ``to_json`` is the object producers read.

    Field order is the JSON key order, which is part of the contract (results are compared
    byte for byte across duplicate deliveries).
    """

    text: str
    model: str
    image: str
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str
    seconds: float  # time in the model, rounded to 0.1 ms
    batch_size: int
    worker: str
    image_size: tuple[int, int]  # as stored
    model_image_size: tuple[int, int]  # after the pixel budget, as the model saw it
    model_revision: str | None
    quantization: dict[str, Any] | None
    dtype: str | None
    versions: dict[str, str] | None
    model_loaded_at: float

    def to_json(self) -> dict[str, Any]:
        """The result as plain JSON values (tuples become lists)."""
        out = asdict(self)
        out["image_size"] = list(self.image_size)
        out["model_image_size"] = list(self.model_image_size)
        return out
