"""Weight forms: serve SDNQ weights as stored, dequantized once, or re-quantized to int8.

SDNQ uint4+SVD layers rebuild every weight in every forward call; that is most of a decode
step's cost. ``bf16`` dequantizes each layer once after load with sdnq's own dequantizer
(the same weights sdnq computes on the fly, in ``CAPTION_DTYPE``): about 2.5x the memory,
no per-call rebuild. ``int8`` dequantizes one decoder block at a time and re-quantizes it
row-wise to int8 with sdnq's quantized matmul: half of ``bf16``'s memory, and the peak
during conversion stays one block above the result. Before converting, the memory the
result needs is estimated and the worker refuses to start if it does not fit the device
with room left for the KV cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Literal

from worker.errors import ConfigError

log = logging.getLogger(__name__)

WeightForm = Literal["sdnq", "bf16", "int8"]
GIB = 2**30


def _sdnq_layers(model: Any) -> list[Any]:
    from sdnq.layers import SDNQLayer

    return [m for m in model.modules() if isinstance(m, SDNQLayer)]


def _stored_bytes(module: Any) -> int:
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return sum(t.numel() * t.element_size() for t in tensors)


def numel(shape: Sequence[int]) -> int:
    """Elements of a tensor of ``shape``."""
    count = 1
    for size in shape:
        count *= int(size)
    return count


def layer_extra_bytes(
    form: WeightForm, dtype_bytes: int, dense_numel: int, rows: int, stored_bytes: int
) -> int:
    """Bytes one SDNQ layer grows by (may be < 0) when served in ``form``: its dense weight
    of ``dense_numel`` elements in the new form, minus the ``stored_bytes`` it takes now.

    The one copy of this arithmetic: ``extra_bytes`` applies it to a loaded model's layers,
    ``worker.engine.footprint`` to a checkpoint's safetensors headers.
    """
    if form == "sdnq":
        return 0
    per_weight = dtype_bytes if form == "bf16" else 1  # int8: one byte and a scale per row
    scales = rows * 4 if form == "int8" else 0
    return dense_numel * per_weight + scales - stored_bytes


def extra_bytes(model: Any, form: WeightForm, dtype_bytes: int) -> int:
    """Bytes the converted model needs beyond what its SDNQ layers take now (may be < 0)."""
    if form == "sdnq":
        return 0
    extra = 0
    for layer in _sdnq_layers(model):
        shape = layer.sdnq_dequantizer.original_shape
        stored = _stored_bytes(layer)
        extra += layer_extra_bytes(form, dtype_bytes, numel(shape), int(shape[0]), stored)
    return extra


def check_fit(model: Any, form: WeightForm, dtype_bytes: int, reserve_bytes: int) -> None:
    """Refuse a weight form that would not fit the GPU with ``reserve_bytes`` to spare."""
    import torch

    device = next(model.parameters()).device
    if form == "sdnq" or device.type != "cuda":
        return  # CPU memory is the operator's to size; CUDA is what runs out at the worst time
    free, _ = torch.cuda.mem_get_info(device)
    needed = extra_bytes(model, form, dtype_bytes) + reserve_bytes
    if needed > free:
        raise ConfigError(
            f"CAPTION_WEIGHTS={form} needs {needed / GIB:.1f} GiB more on {device} "
            f"({reserve_bytes / GIB:.1f} GiB of it for the KV cache and activations) but "
            f"{free / GIB:.1f} GiB is free; use CAPTION_WEIGHTS=int8 (half of bf16), sdnq "
            "(as stored, least memory), fewer CAPTION_SLOTS, or a larger GPU"
        )


def _blocks(model: Any) -> list[Any]:
    """The decoder and vision blocks: units converted one at a time."""
    return [*model.model.language_model.layers, *model.model.visual.blocks]


def convert(model: Any, form: WeightForm, dtype: Any) -> Any:
    """Convert the model's SDNQ layers in place to ``form``; returns the model."""
    import torch
    from sdnq import sdnq_post_load_quant
    from sdnq.dequantizer import dequantize_sdnq_model, dequantize_sdnq_module

    if form == "sdnq" or not _sdnq_layers(model):
        return model
    started = time.perf_counter()
    # The new parameters would require grad outside inference mode.
    with torch.inference_mode():
        if form == "bf16":
            model = dequantize_sdnq_model(model)
        else:
            for block in _blocks(model):
                dequantize_sdnq_module(block)
                sdnq_post_load_quant(
                    block,
                    weights_dtype="int8",
                    use_quantized_matmul=True,
                    torch_dtype=dtype,
                    add_skip_keys=False,
                    minimum_allowed_numel=0,
                )
    log.info("weights converted to %s in %.1fs", form, time.perf_counter() - started)
    return model
