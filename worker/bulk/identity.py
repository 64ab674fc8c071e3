"""What makes two captions the same: the run's config hash and each item's identity.

A caption depends on the image bytes and on everything that steers the model: the model and
its revision, the prompt, the generation options and the pixel budget. The config hash is
the first 16 hex digits of the SHA-256 of those values as canonical JSON (sorted keys, no
spaces, UTF-8), so it is stable across processes, machines and Python versions, and any
change to one of them gives a new hash. An item's identity is ``(image URI, ETag, config
hash)``: the URI names bucket and key, the ETag the bytes, the hash the settings. An item
whose manifest line overrides the prompt or ``max_new_tokens`` gets the hash of the run's
config with those values replaced.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

from worker.contract import GenerationOptions, parse_request
from worker.errors import ConfigError
from worker.settings import Settings

#: Hex digits kept of the SHA-256: 64 bits, so a collision between two configs of one
#: output prefix is out of reach (there are at most a few thousand).
HASH_CHARS = 16
# parse_request validates a whole task; planning has no image yet, so it checks the
# generation arguments against this stand-in.
_PLACEHOLDER_IMAGE = "s3://placeholder/planning"


class Identity(NamedTuple):
    """What an earlier ``ok`` output line must match for an item to be skipped."""

    image: str  # s3://bucket/key
    etag: str
    config: str


def canonical_model(spec: str) -> str:
    """The model's name as a worker loading ``spec`` reports it (a catalogue entry's name, a
    local directory's absolute path), so items match the worker that serves them and two
    spellings of one model hash alike. A path that does not exist here (the submitter is not a
    worker host) is kept as given."""
    from worker.engine.catalogue import resolve_model

    try:
        return resolve_model(spec).name
    except ConfigError:
        return spec.strip()


@dataclass(frozen=True)
class RunConfig:
    """Everything that steers the model in one run; its hash names the captions it makes."""

    model: str
    revision: str | None
    prompt: str
    max_new_tokens: int
    options: GenerationOptions
    max_pixels: int

    @classmethod
    def from_arguments(cls, settings: Settings, arguments: dict[str, Any]) -> RunConfig:
        """The run's config from caption-task arguments (``prompt``, ``max_new_tokens``,
        ``do_sample``, ...), validated and defaulted exactly as a ``caption`` task would be
        (raises InvalidRequest), with the model and revision the submitter has configured."""
        request = parse_request({**arguments, "image": _PLACEHOLDER_IMAGE}, settings)
        return cls(
            model=canonical_model(settings.model),
            revision=settings.revision,
            prompt=request.prompt,
            max_new_tokens=request.max_new_tokens,
            options=request.options,
            max_pixels=request.max_pixels,
        )

    def to_json(self) -> dict[str, Any]:
        """The hashed values as plain JSON, also recorded in run.json."""
        return {
            "model": self.model,
            "revision": self.revision,
            "prompt": self.prompt,
            "max_new_tokens": self.max_new_tokens,
            "generation": asdict(self.options),
            "max_pixels": self.max_pixels,
        }

    @functools.cached_property
    def config_hash(self) -> str:
        """First 16 hex digits of the SHA-256 of the canonical JSON of ``to_json()``."""
        return config_hash(self.to_json())

    def item_config(self, prompt: str | None, max_new_tokens: int | None) -> str:
        """The config hash of an item with its own overrides (None: the run's value)."""
        if prompt is None and max_new_tokens is None:
            return self.config_hash
        return _overridden_hash(self, prompt, max_new_tokens)


def canonical_json(value: Any) -> bytes:
    """One byte string per value: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def config_hash(config: dict[str, Any]) -> str:
    """First 16 hex digits of the SHA-256 of ``config`` as canonical JSON."""
    return hashlib.sha256(canonical_json(config)).hexdigest()[:HASH_CHARS]


# Bounded: a manifest may give every line its own prompt, and most repeat a few.
@functools.lru_cache(maxsize=4_096)
def _overridden_hash(run: RunConfig, prompt: str | None, max_new_tokens: int | None) -> str:
    changed = replace(
        run,
        prompt=run.prompt if prompt is None else prompt,
        max_new_tokens=run.max_new_tokens if max_new_tokens is None else max_new_tokens,
    )
    return changed.config_hash
