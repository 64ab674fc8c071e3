"""The model's files on this machine: a local directory, or a snapshot in the Hugging Face
cache, looked up offline; nothing is downloaded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from worker.engine.catalogue import ResolvedModel
from worker.ops.doctor.report import CheckResult, Status, human_size

#: What ``from_pretrained`` needs besides the weights: the model and tokenizer configs.
REQUIRED_FILES = ("config.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelFiles:
    """Where the configured model's files are on this machine, if anywhere."""

    resolved: ResolvedModel
    directory: Path | None  # the local directory or the cache snapshot; None if not cached
    missing: tuple[str, ...] = ()  # required files absent from ``directory``
    weight_files: tuple[Path, ...] = ()


def _weight_files(directory: Path) -> tuple[tuple[Path, ...], tuple[str, ...]]:
    """The safetensors files a checkpoint in ``directory`` needs, and which are missing."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    paths = tuple(directory / name for name in shards)
    return paths, tuple(p.name for p in paths if not p.is_file())


def model_files_in(resolved: ResolvedModel, directory: Path | None) -> ModelFiles:
    """What ``directory`` holds of the files ``from_pretrained`` will ask for."""
    if directory is None or not directory.is_dir():
        return ModelFiles(resolved, None)
    weights, missing_weights = _weight_files(directory)
    missing = tuple(n for n in REQUIRED_FILES if not (directory / n).is_file())
    return ModelFiles(resolved, directory, missing + missing_weights, weights)


def find_model_files(
    resolved: ResolvedModel, revision: str | None, cache_dir: str | Path | None = None
) -> ModelFiles:
    """The model's local directory, or its snapshot in the Hugging Face cache; offline only.

    ``cache_dir`` defaults to the hub cache under ``HF_HOME``, as ``from_pretrained`` uses.
    """
    if resolved.is_local:
        return model_files_in(resolved, Path(resolved.source))
    from huggingface_hub import try_to_load_from_cache

    # A pure cache lookup: reads refs/ and snapshots/, never the network.
    found = try_to_load_from_cache(
        resolved.source, "config.json", cache_dir=cache_dir, revision=revision
    )
    return model_files_in(resolved, Path(found).parent if isinstance(found, str) else None)


def hub_cache_dir(cache_dir: str | Path | None = None) -> str:
    """The Hugging Face hub cache doctor looks in (``HF_HOME``/hub unless given)."""
    if cache_dir is not None:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def check_model(
    files: ModelFiles, auto_download: bool, cache_dir: str, revision: str | None = None
) -> CheckResult:
    """The model's files are on this machine, or the worker may download them."""
    resolved = files.resolved
    pinned = f" --revision {revision}" if revision else ""
    fetch = f"`hf download {resolved.source}{pinned}`"
    if resolved.is_local:
        if files.directory is None or files.missing:
            return CheckResult(
                "model",
                Status.FAIL,
                f"{resolved.source} lacks {', '.join(files.missing[:3]) or 'its files'}: point "
                "CAPTION_MODEL at a directory saved with save_pretrained",
            )
        size = sum(p.stat().st_size for p in files.weight_files)
        return CheckResult(
            "model", Status.OK, f"{resolved.source} holds the model ({human_size(size)} of weights)"
        )
    if files.directory is None or files.missing:
        where = (
            f"the cache snapshot {files.directory} lacks {', '.join(files.missing[:3])}"
            if files.directory is not None
            else f"{resolved.source} is not in the Hugging Face cache at {cache_dir}"
        )
        if auto_download:
            return CheckResult(
                "model",
                Status.WARN,
                f"{where}; the worker downloads it at start (needs hub access and time): "
                f"fetch it ahead with {fetch}",
            )
        return CheckResult(
            "model",
            Status.FAIL,
            f"{where} and CAPTION_AUTO_DOWNLOAD=false: fetch it with {fetch}, point HF_HOME "
            "at the cache that holds it, or allow downloads",
        )
    size = sum(p.stat().st_size for p in files.weight_files)
    return CheckResult(
        "model",
        Status.OK,
        f"{resolved.name} is in the Hugging Face cache ({human_size(size)} of weights in "
        f"{files.directory})",
    )
