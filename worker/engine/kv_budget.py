"""How many slots the device has room for: the slot engine's KV cache is allocated whole at
start, so it is sized against the memory the loaded weights left.

With ``CAPTION_SLOTS`` unset the worker starts with as many slots as fit (at most the
default) and says so; with it set, a cache that does not fit is refused at start with the
numbers and the ways out, instead of an out-of-memory traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from worker.errors import ModelLoadError

log = logging.getLogger(__name__)

GIB = 2**30


def kv_bytes_per_token(text_config: Any, dtype_bytes: int) -> int:
    """Bytes one token takes in a KV cache: keys and values of every decoder layer. The one
    copy of this arithmetic (the slot budget below, ``loading.reserve_bytes`` and, through
    it, doctor's estimate)."""
    per_token = 2 * text_config.num_hidden_layers * text_config.num_key_value_heads
    return int(per_token * text_config.head_dim * dtype_bytes)


def kv_bytes_per_slot(model: Any, capacity: int) -> int:
    """Bytes one slot of ``capacity`` tokens takes, in the dtype the cache is allocated in
    (``qwen3vl.StaticKVCache``)."""
    text = model.model.language_model
    return kv_bytes_per_token(text.config, text.norm.weight.element_size()) * capacity


def free_device_bytes(device: str) -> int | None:
    """Memory the process can still allocate on a CUDA ``device`` (free, plus what torch's
    allocator holds unused); None elsewhere."""
    if not device.startswith("cuda"):
        return None
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + unused)


def slots_that_fit(
    wanted: int, explicit: bool, per_slot: int, room: int | None, capacity: int
) -> int:
    """The slot count to allocate: ``wanted``, or fewer when ``room`` (bytes left for the
    cache; None: not known, e.g. on the CPU) holds fewer and the count was not set.

    Raises ModelLoadError when not even one slot fits, or an explicit count does not.
    """
    if room is None or wanted * per_slot <= room:
        return wanted
    fit = max(0, room // per_slot)
    need = f"{wanted} slots of {capacity} tokens need {wanted * per_slot / GIB:.1f} GiB"
    left = f"{max(room, 0) / GIB:.1f} GiB is left after the weights and activations"
    if fit >= 1 and not explicit:
        log.warning("KV cache: %s but %s: starting with %d slots", need, left, fit)
        return int(fit)
    raise ModelLoadError(
        f"KV cache: {need} but {left} ({fit} would fit): lower CAPTION_SLOTS or "
        "CAPTION_SLOT_TOKENS, serve smaller weights (CAPTION_WEIGHTS=int8 or sdnq), or use "
        "CAPTION_ENGINE=generate"
    )
