"""A tiny random Qwen3-VL, SDNQ-quantized and saved like a hub repo, for tests and demos.

``build_tiny_model(out_dir)`` writes a directory that the worker loads exactly as it loads a
real pre-quantized checkpoint (``import sdnq`` then ``AutoModelForImageTextToText`` and
``AutoProcessor``): ``config.json`` with ``quantization_config.quant_method == "sdnq"``,
safetensors weights (uint4 + SVD), ``generation_config.json``, a byte-level BPE tokenizer
with Qwen's special tokens, the Qwen3-VL chat template and a ``Qwen3VLProcessor``. The
weights are random, so captions are gibberish, but they are deterministic for a seed, and
the output head is built so that greedy decoding always yields ordinary text tokens.

Importing this module imports neither torch nor transformers; the build function does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from worker.devtools.tiny_processor import (
    TINY_IMAGE_SIZE,
    TINY_VIDEO_SIZE,
    VOCAB_MULTIPLE,
    build_tokenizer,
    caption_token_ids,
    make_processor,
    special_token_ids,
    untyped_transformers,
)

TINY_TEXT: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
}
TINY_VISION: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_heads": 2,
    "out_hidden_size": 128,
    "num_position_embeddings": 256,
    "deepstack_visual_indexes": [0, 1],
}


def make_config(
    ids: dict[str, int], *, vocab_size: int, text: dict[str, Any], vision: dict[str, Any]
) -> Any:
    """A fresh ``Qwen3VLConfig``; build one per model, since sdnq writes into it."""
    head_dim = int(text["head_dim"])
    half = head_dim // 2
    # Qwen3-VL's interleaved M-RoPE sections (t, h, w) sum to head_dim / 2: 128 -> [24, 20, 20].
    section = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]
    return untyped_transformers().Qwen3VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "max_position_embeddings": 32768,
            "bos_token_id": ids["pad"],
            "eos_token_id": ids["eos"],
            "pad_token_id": ids["pad"],
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": section,
                "mrope_interleaved": True,
            },
            **text,
        },
        vision_config={
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            **vision,
        },
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=False,
    )


def make_generation_config(ids: dict[str, int]) -> Any:
    """Greedy by default; stops at ``<|im_end|>`` or ``<|endoftext|>`` like Qwen3-VL."""
    return untyped_transformers().GenerationConfig(
        bos_token_id=ids["pad"],
        eos_token_id=[ids["eos"], ids["pad"]],
        pad_token_id=ids["pad"],
        do_sample=False,
    )


def shape_output_head(weight: Any, keep_ids: list[int]) -> None:
    """Make greedy decoding always pick one of ``keep_ids``, in place on ``lm_head.weight``.

    Every other row is zeroed, so those tokens (special tokens included) always score
    exactly 0. The kept rows come in (+w, -w) pairs, so for any hidden state one of each
    pair scores >= 0 and, almost surely, some kept token scores strictly above 0.
    """
    import torch

    with torch.no_grad():
        keep = torch.tensor(keep_ids[: len(keep_ids) // 2 * 2], device=weight.device)
        kept = weight[keep].clone()
        weight.zero_()
        weight[keep[0::2]] = kept[0::2]
        weight[keep[1::2]] = -kept[0::2]


def sort_quantization_lists(quantization_config: Any) -> None:
    """Sort the skip lists sdnq builds through ``set()``, so config.json is byte-stable."""
    for name in ("modules_to_not_convert", "modules_to_not_use_matmul"):
        value = getattr(quantization_config, name, None)
        if isinstance(value, list):
            setattr(quantization_config, name, sorted(value))
    dtype_dict = getattr(quantization_config, "modules_dtype_dict", None)
    if isinstance(dtype_dict, dict):
        for key, value in dtype_dict.items():
            dtype_dict[key] = sorted(value)


def save_world_readable(out_dir: Path) -> None:
    """safetensors writes 0600; a repo copied into a container may be read by another user."""
    for path in out_dir.iterdir():
        if path.is_file():
            os.chmod(path, 0o644)


def build_tiny_model(out_dir: Path, *, seed: int = 0) -> Path:
    """Write a tiny random SDNQ uint4+SVD Qwen3-VL repo into ``out_dir`` and return it.

    Same ``seed``, same files (byte for byte) and the same greedy captions. Greedy decoding
    never picks a special token (see ``shape_output_head``), so a caption always runs to
    ``max_new_tokens`` and decodes to readable ASCII word pieces. About 1 MB on disk.
    """
    import torch
    from sdnq import sdnq_post_load_quant

    tf = untyped_transformers()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    ids = special_token_ids(tokenizer)
    vocab_size = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    config = make_config(ids, vocab_size=vocab_size, text=TINY_TEXT, vision=TINY_VISION)

    # fork_rng: seed locally without disturbing the caller's global RNG stream. The RNG
    # also drives sdnq's randomized SVD, so quantization sits inside the fork too.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.Qwen3VLForConditionalGeneration(config).to(torch.bfloat16).eval()
        # sdnq keeps lm_head unquantized (one of its skip keys), so this survives exactly.
        shape_output_head(model.lm_head.weight, caption_token_ids(tokenizer))
        model = sdnq_post_load_quant(
            model,
            weights_dtype="uint4",
            use_svd=True,
            svd_rank=8,
            minimum_allowed_numel=0,  # else the tiny layers stay plain nn.Linear
            torch_dtype=torch.bfloat16,
        )
    sort_quantization_lists(model.quantization_config)
    model.generation_config = make_generation_config(ids)
    model.save_pretrained(out_dir)
    processor = make_processor(tokenizer, image_size=TINY_IMAGE_SIZE, video_size=TINY_VIDEO_SIZE)
    processor.save_pretrained(out_dir)
    save_world_readable(out_dir)
    return out_dir
