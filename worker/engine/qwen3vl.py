"""Qwen3-VL forward passes for the slot engine: prefill one row, decode one step for all slots.

Prefill goes through the model's own ``forward`` (vision encoder, deepstack features, 3-row
mrope positions) with a fresh dynamic cache, for new rows batched with left padding exactly
as ``generate`` batches them; each row's keys and values are then copied into its slot of a
static cache. Decode runs the
text decoder layer by layer over every slot at once, with fixed shapes: one new token per
slot, written at that slot's own position, and attention masked to the slot's length. A
row's rope delta (mrope position minus sequence position, fixed after its image) is kept
here per slot, never on the model object.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Prefilled:
    """One row after prefill: next-token logits, its length and its rope delta."""

    logits: torch.Tensor  # (vocab,)
    length: int
    rope_delta: int


class StaticKVCache:
    """Keys and values for ``slots`` rows of up to ``capacity`` tokens, per decoder layer."""

    def __init__(self, model: Any, slots: int, capacity: int) -> None:
        text = model.model.language_model.config
        shape = (slots, text.num_key_value_heads, capacity, text.head_dim)
        # The final norm is never quantized (an embedding can be, with sdnq's
        # quant_embedding): its dtype is the compute dtype, whatever form the weights take.
        param = model.model.language_model.norm.weight
        # Zeros, not empty: masked positions still enter the attention matmul, and 0 * NaN
        # would poison a row.
        self.keys = [
            torch.zeros(shape, dtype=param.dtype, device=param.device)
            for _ in range(text.num_hidden_layers)
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.slots = slots
        self.capacity = capacity

    def clear(self) -> None:
        """Zero every slot."""
        for tensor in (*self.keys, *self.values):
            tensor.zero_()

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k in self.keys)

    def load(self, slot: int, dynamic_cache: Any, row: int, length: int) -> None:
        """Copy row ``row`` of a prefilled batch's cache (left-padded) into ``slot``."""
        for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            source = dynamic_cache.layers[layer]
            k[slot, :, :length] = source.keys[row, :, -length:]
            v[slot, :, :length] = source.values[row, :, -length:]


@torch.inference_mode()
def prefill(model: Any, rows: list[dict[str, Any]], pad_id: int) -> tuple[list[Prefilled], Any]:
    """Run prepared rows through the full model as one left-padded batch.

    Returns each row's next-token logits, length and rope delta, and the batch's dynamic
    cache (row ``i`` occupies its last ``length`` positions; see ``StaticKVCache.load``).
    """
    from transformers import DynamicCache

    from worker.engine.hf_generate import collate

    cache = DynamicCache(config=model.config.text_config)
    inputs = collate(rows, pad_id).to(model.device)
    # The model keeps the last rope deltas on itself; clear them so these rows' are computed
    # from their own image grids, and clear them after, so nothing leaks into the next call.
    model.model.rope_deltas = None
    try:
        given = {_cache_argument(model.__class__): cache}
        out = model(**inputs, **given, use_cache=True, logits_to_keep=1)
        deltas = [int(d) for d in model.model.rope_deltas[:, 0].tolist()]
    finally:
        model.model.rope_deltas = None
    lengths = [int(r["input_ids"].shape[1]) for r in rows]
    logits = out.logits[:, -1]
    return [Prefilled(logits[i], lengths[i], deltas[i]) for i in range(len(rows))], cache


@functools.cache
def _cache_argument(model_type: Any) -> str:
    """The name ``forward`` takes the KV cache under: ``past_key_values`` up to transformers
    5.2x, ``cache`` after. An unknown name would be swallowed by ``**kwargs`` and the model
    would fill a cache of its own, so ask the signature (once per model class) rather than
    guess."""
    parameters = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@torch.inference_mode()
def decode_step(
    model: Any,
    cache: StaticKVCache,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    deltas: torch.Tensor,
    keys: int,
) -> torch.Tensor:
    """One decode step for the first ``n`` slots; returns next-token logits, shape (n, vocab).

    ``tokens`` are each slot's last token, ``lengths`` its cache length before that token
    (the position it is written at) and ``deltas`` its rope delta; all shape (n,). Attention
    reads the first ``keys`` cache positions, which must exceed every length. Slots without a
    row run too (shapes stay in a few buckets); what they write is overwritten at their next
    prefill.
    """
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

    text = model.model.language_model
    n = tokens.shape[0]
    hidden = text.embed_tokens(tokens[:, None])
    # Decode tokens are text: the same position on all three mrope rows.
    positions = (lengths + deltas)[None, :, None].expand(3, n, 1)
    cos, sin = text.rotary_emb(hidden, positions)
    keys_at = torch.arange(keys, device=tokens.device)
    visible = (keys_at[None, :] <= lengths[:, None])[:, None, None, :]
    attention, mask = _attention(text.config._attn_implementation, visible, hidden.dtype)
    rows = torch.arange(n, device=tokens.device)
    for index, layer in enumerate(text.layers):
        residual = hidden
        x = layer.input_layernorm(hidden)
        attn = layer.self_attn
        shape = (n, 1, -1, attn.head_dim)
        q = attn.q_norm(attn.q_proj(x).view(shape)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(x).view(shape)).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        layer_keys = cache.keys[index][:n]
        layer_values = cache.values[index][:n]
        layer_keys[rows, :, lengths] = k[:, :, 0]
        layer_values[rows, :, lengths] = v[:, :, 0]
        out, _ = attention(
            attn,
            q,
            layer_keys[:, :, :keys],
            layer_values[:, :, :keys],
            mask,
            dropout=0.0,
            scaling=attn.scaling,
        )
        hidden = residual + attn.o_proj(out.reshape(n, 1, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    hidden = text.norm(hidden)
    return model.lm_head(hidden[:, -1])  # type: ignore[no-any-return]


def _attention(implementation: str, visible: torch.Tensor, dtype: torch.dtype) -> tuple[Any, Any]:
    """The attention function for the decode step and the mask in the form it takes.

    ``eager`` adds its mask to the scores, so it gets 0 / the dtype's minimum (a boolean
    mask would add 1 and 0 and hide nothing). Everything else runs SDPA with the boolean
    mask: flash-attention kernels take 2-D padding masks, not a slot's 4-D mask, and SDPA is
    what they would compute."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.qwen3_vl.modeling_qwen3_vl import eager_attention_forward

    if implementation == "eager":
        additive = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
        additive.masked_fill_(~visible, torch.finfo(dtype).min)
        return eager_attention_forward, additive
    return ALL_ATTENTION_FUNCTIONS["sdpa"], visible
