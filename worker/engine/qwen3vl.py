"""Qwen3-VL forward passes for the slot engine: prefill one row, decode one step for all slots.

Prefill goes through the model's own ``forward`` (vision encoder, deepstack features, 3-row
mrope positions) with a fresh dynamic cache, exactly as ``generate`` does for a lone row;
its keys and values are then copied into the row's slot of a static cache. Decode runs the
text decoder layer by layer over every slot at once, with fixed shapes: one new token per
slot, written at that slot's own position, and attention masked to the slot's length. A
row's rope delta (mrope position minus sequence position, fixed after its image) is kept
here per slot, never on the model object.
"""

from __future__ import annotations

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
        param = next(model.model.language_model.parameters())
        dtype = param.dtype if param.dtype.is_floating_point else torch.bfloat16
        # Zeros, not empty: masked positions still enter the attention matmul, and 0 * NaN
        # would poison a row.
        self.keys = [
            torch.zeros(shape, dtype=dtype, device=param.device)
            for _ in range(text.num_hidden_layers)
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.slots = slots
        self.capacity = capacity

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k in self.keys)

    def load(self, slot: int, dynamic_cache: Any, length: int) -> None:
        """Copy a prefilled row's cache (batch of one) into ``slot``."""
        for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            source = dynamic_cache.layers[layer]
            k[slot, :, :length] = source.keys[0]
            v[slot, :, :length] = source.values[0]


@torch.inference_mode()
def prefill(model: Any, tensors: dict[str, Any]) -> tuple[Prefilled, Any]:
    """Run one prepared row through the full model; return its logits and dynamic cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.text_config)
    inputs = {k: v.to(model.device) for k, v in tensors.items()}
    # The model keeps the last rope deltas on itself; clear them so this row's are computed
    # from its own image grid, and clear them after, so nothing leaks into the next call.
    model.model.rope_deltas = None
    try:
        out = model(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
        delta = int(model.model.rope_deltas[0, 0])
    finally:
        model.model.rope_deltas = None
    length = int(inputs["input_ids"].shape[1])
    return Prefilled(out.logits[0, -1], length, delta), cache


@torch.inference_mode()
def decode_step(
    model: Any,
    cache: StaticKVCache,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    deltas: torch.Tensor,
) -> torch.Tensor:
    """One decode step for every slot; returns next-token logits, shape (slots, vocab).

    ``tokens`` are each slot's last token, ``lengths`` its cache length before that token
    (the position it is written at) and ``deltas`` its rope delta; all shape (slots,). Free
    slots run too (shapes stay fixed); what they write is overwritten at their next prefill.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.qwen3_vl.modeling_qwen3_vl import (
        apply_rotary_pos_emb,
        eager_attention_forward,
    )

    text = model.model.language_model
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(
        text.config._attn_implementation, eager_attention_forward
    )
    slots = tokens.shape[0]
    hidden = text.embed_tokens(tokens[:, None])
    # Decode tokens are text: the same position on all three mrope rows.
    positions = (lengths + deltas)[None, :, None].expand(3, slots, 1)
    cos, sin = text.rotary_emb(hidden, positions)
    keys_at = torch.arange(cache.capacity, device=tokens.device)
    mask = (keys_at[None, :] <= lengths[:, None])[:, None, None, :]
    rows = torch.arange(slots, device=tokens.device)
    for index, layer in enumerate(text.layers):
        residual = hidden
        x = layer.input_layernorm(hidden)
        attn = layer.self_attn
        shape = (slots, 1, -1, attn.head_dim)
        q = attn.q_norm(attn.q_proj(x).view(shape)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(x).view(shape)).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        cache.keys[index][rows, :, lengths] = k[:, :, 0]
        cache.values[index][rows, :, lengths] = v[:, :, 0]
        out, _ = attention(
            attn, q, cache.keys[index], cache.values[index], mask, dropout=0.0, scaling=attn.scaling
        )
        hidden = residual + attn.o_proj(out.reshape(slots, 1, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    hidden = text.norm(hidden)
    return model.lm_head(hidden[:, -1])  # type: ignore[no-any-return]
