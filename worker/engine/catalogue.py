"""The model catalogue: which SDNQ checkpoints exist and which of them write text.

``CAPTION_MODEL`` names an entry here, a Hugging Face repo id, or a local directory. The
worker serves only ``output_type == "text"`` models; image generators share the catalogue
(they come from the same SDNQ family) but are refused with a clear message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from worker.errors import ConfigError

OutputType = Literal["text", "image"]


@dataclass(frozen=True)
class ModelEntry:
    """One catalogue row, in the shape of the SDNQ node registry."""

    name: str
    repo_id: str
    type: str
    output_type: OutputType
    quant_level: str
    description: str
    priority: int


CATALOGUE: tuple[ModelEntry, ...] = (
    ModelEntry(
        name="Qwen3-VL-32B-Instruct-SDNQ-uint4",
        repo_id="Disty0/Qwen3-VL-32B-Instruct-SDNQ-uint4-svd-r32",
        type="Qwen-VL",
        output_type="text",
        quant_level="uint4",
        description="Qwen3-VL-32B 4-bit SVD - image-to-text captioning (~20 GiB of weights)",
        priority=50,
    ),
    ModelEntry(
        name="FLUX.1-dev-qint4",
        repo_id="Disty0/FLUX.1-dev-qint4",
        type="FLUX",
        output_type="image",
        quant_level="qint4",
        description="FLUX.1-dev 4-bit - text-to-image generation (not a captioner)",
        priority=10,
    ),
)

_BY_NAME = {entry.name: entry for entry in CATALOGUE}
_BY_REPO = {entry.repo_id: entry for entry in CATALOGUE}


@dataclass(frozen=True)
class ResolvedModel:
    """What ``CAPTION_MODEL`` points at: a name for results, and where to load from."""

    name: str  # what results report and what a task's ``model`` argument must match
    source: str  # a repo id or an absolute local path, passed to from_pretrained
    is_local: bool
    entry: ModelEntry | None

    def matches(self, requested: str) -> bool:
        """Whether a task's ``model`` argument names this model by any of its names."""
        names = {self.name, self.source}
        if self.entry is not None:
            names |= {self.entry.name, self.entry.repo_id}
        return requested in names


def text_models() -> list[ModelEntry]:
    """Catalogue entries this worker can serve, best first."""
    return sorted((e for e in CATALOGUE if e.output_type == "text"), key=lambda e: -e.priority)


def resolve_model(spec: str) -> ResolvedModel:
    """Resolve a registry name, repo id or local directory, refusing non-text models."""
    spec = spec.strip()
    if not spec:
        raise ConfigError("CAPTION_MODEL is empty: name a catalogue entry, repo id or path")
    entry = _BY_NAME.get(spec) or _BY_REPO.get(spec)
    if entry is not None:
        if entry.output_type != "text":
            raise ConfigError(
                f"CAPTION_MODEL={spec!r} is an {entry.output_type}-generation model; "
                "the caption worker needs a text-output (vision-language) model. "
                "Run `caption-worker models` for the list."
            )
        return ResolvedModel(entry.name, entry.repo_id, is_local=False, entry=entry)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ResolvedModel(str(path.resolve()), str(path.resolve()), True, None)
    if spec.startswith((".", "/", "~")):
        raise ConfigError(f"CAPTION_MODEL={spec!r} looks like a path but is not a directory")
    if spec.count("/") != 1:
        raise ConfigError(
            f"CAPTION_MODEL={spec!r} is neither a catalogue name, an 'owner/name' repo id, "
            "nor an existing directory. Run `caption-worker models` for the catalogue."
        )
    return ResolvedModel(spec, spec, is_local=False, entry=None)
