"""GPU memory a model needs, estimated from its safetensors headers without loading it.

``estimate_footprint`` reads only the headers (tensor names, dtypes, shapes) of a
checkpoint and answers what the worker itself computes once the model is loaded: the
weights as loaded, what ``CAPTION_WEIGHTS`` adds per SDNQ layer
(``worker.engine.weights.layer_extra_bytes``, the same function ``extra_bytes`` uses), and
the KV cache and activation reserve (``worker.engine.loading.reserve_bytes``).
``caption-worker doctor`` uses it to say whether a weight form fits a GPU before a worker
starts there.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from worker.engine.weights import layer_extra_bytes, numel
from worker.settings import Settings

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
#: Bytes per element of safetensors dtypes, for tensors whose size changes with the dtype.
_FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_SAFETENSORS_BYTES = {
    **_FLOAT_DTYPES,
    **{"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1},
    **{"U16": 2, "I16": 2, "U32": 4, "I32": 4, "U64": 8, "I64": 8},
}
#: An SDNQ layer's packed weight and quantization parameters load as stored.
_SDNQ_PARAMS = frozenset({"weight", "scale", "zero_point"})
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own cap on a header


@dataclass(frozen=True)
class Footprint:
    """GPU memory a worker needs for the model, estimated from its files without loading."""

    weights_bytes: int  # the checkpoint as loaded: SDNQ layers as stored, the rest in dtype
    extra_bytes: int  # what CAPTION_WEIGHTS adds on top (worker.engine.weights.extra_bytes)
    reserve_bytes: int  # KV cache and activations (worker.engine.loading.reserve_bytes)
    quantized: bool  # an SDNQ checkpoint; CAPTION_WEIGHTS applies only to those


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's JSON header (tensor names, dtypes, shapes); the data is not read."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > _MAX_HEADER_BYTES:
            raise ValueError(f"{path.name}: safetensors header of {length} bytes")
        header: dict[str, Any] = json.loads(fh.read(length))
    header.pop("__metadata__", None)
    return header


def _nbytes(info: Mapping[str, Any]) -> int:
    return numel(info["shape"]) * _SAFETENSORS_BYTES.get(info["dtype"], 1)


def _bits(dtype_name: str) -> int:
    """Bits per weight of an SDNQ dtype name (uint4 -> 4, float8_e4m3fn -> 8)."""
    match = re.search(r"\d+", dtype_name)
    return int(match.group()) if match else 8


def _layer_bits(layer: str, quant: Mapping[str, Any]) -> int:
    for dtype_name, names in (quant.get("modules_dtype_dict") or {}).items():
        if any(layer == n or layer + "." in n or n in layer for n in names):
            return _bits(dtype_name)
    return _bits(str(quant.get("weights_dtype", "int8")))


def _sdnq_layers(tensors: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """Prefixes of SDNQ layers: modules stored as packed weight plus a scale."""
    return {
        name.removesuffix(".scale")
        for name in tensors
        if name.endswith(".scale") and name.removesuffix(".scale") + ".weight" in tensors
    }


def _original_numel(
    layer: str, tensors: Mapping[str, Mapping[str, Any]], quant: Mapping[str, Any]
) -> int:
    """Elements of the layer's dense weight: exact from the SVD factors when stored,
    otherwise from the packed weight's bytes and the layer's bits per weight."""
    up, down = tensors.get(f"{layer}.svd_up"), tensors.get(f"{layer}.svd_down")
    if up is not None and down is not None:
        return int(up["shape"][0]) * int(down["shape"][-1])
    return _nbytes(tensors[f"{layer}.weight"]) * 8 // _layer_bits(layer, quant)


def _loaded_bytes(
    name: str, info: Mapping[str, Any], sdnq_layers: set[str], dtype_bytes: int
) -> int:
    """Bytes a stored tensor takes once loaded: float tensors are cast to CAPTION_DTYPE,
    except an SDNQ layer's quantization parameters, which keep their stored precision."""
    layer, _, leaf = name.rpartition(".")
    if info["dtype"] not in _FLOAT_DTYPES or (layer in sdnq_layers and leaf in _SDNQ_PARAMS):
        return _nbytes(info)
    return numel(info["shape"]) * dtype_bytes


def estimate_footprint(
    directory: Path, weight_files: Sequence[Path], settings: Settings
) -> Footprint:
    """GPU memory for the model in CAPTION_WEIGHTS form, from file headers only.

    Each SDNQ layer's growth is ``layer_extra_bytes``, as in ``extra_bytes`` on a loaded
    model, and the reserve is ``reserve_bytes``, so doctor and the worker's own start-up
    check agree; an integration test compares them on a loaded model.
    """
    # Imported on use: loading brings the engine interface and the result contract, which
    # doctor needs only when the model's files are on this machine.
    from worker.engine.loading import reserve_bytes

    config = json.loads((directory / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    quantized = quant.get("quant_method") == "sdnq"
    tensors: dict[str, Mapping[str, Any]] = {}
    for path in weight_files:
        tensors.update(read_safetensors_header(path))
    dtype_bytes = DTYPE_BYTES[settings.dtype]
    layers = _sdnq_layers(tensors) if quantized else set()
    loaded = {
        name: _loaded_bytes(name, info, layers, dtype_bytes) for name, info in tensors.items()
    }
    stored = dict.fromkeys(layers, 0)  # per SDNQ layer, as weights._stored_bytes counts
    for name, n_bytes in loaded.items():
        if (layer := name.rpartition(".")[0]) in stored:
            stored[layer] += n_bytes
    extra = 0
    if settings.weights != "sdnq":
        for layer, stored_bytes in stored.items():
            rows = int(tensors[f"{layer}.scale"]["shape"][0])
            dense = _original_numel(layer, tensors, quant)
            extra += layer_extra_bytes(settings.weights, dtype_bytes, dense, rows, stored_bytes)
    text = dict(config.get("text_config") or config)
    if "head_dim" not in text:  # transformers' default when a config leaves it out
        text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
    # reserve_bytes reads model.config.text_config; the config file has the same fields.
    shaped = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(**text)))
    return Footprint(sum(loaded.values()), extra, reserve_bytes(shaped, settings), quantized)
