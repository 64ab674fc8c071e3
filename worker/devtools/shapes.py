"""Real Qwen3-VL layer shapes, and random-weight models of those shapes for benchmarks.

``random_model_dir("8b", out_dir)`` builds a Qwen3-VL with the 8B model's dimensions and
random bf16 weights on a GPU, SDNQ-quantizes it to uint4 + SVD (rank 32) like the
Disty0 checkpoints, and saves it as a loadable repo. Its speed and memory match the real
model's; its captions are gibberish. The tokenizer, chat template and processor come
from the tiny model (``worker.devtools.tiny_model``) with the real Qwen3-VL pixel limits; their
token ids are all below the real vocabulary size, so they index the real-size embedding.

``"tiny-test"`` is a tiny shape that runs on a CPU, so the code path stays tested.
Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from worker.devtools.tiny_model import (
    TINY_TEXT,
    TINY_VISION,
    make_config,
    save_world_readable,
    shape_output_head,
    sort_quantization_lists,
)
from worker.devtools.tiny_processor import (
    REAL_IMAGE_SIZE,
    REAL_VIDEO_SIZE,
    caption_token_ids,
    make_processor,
    special_token_ids,
    untyped_transformers,
)

QWEN3_VL_VOCAB_SIZE = 151936

# Text decoder dimensions, as in the released Qwen3-VL configs. Every shape keeps lm_head
# separate from the embedding (the released 4B ties them) so all sizes measure the same layout.
TEXT_SHAPES: dict[str, dict[str, Any]] = {
    "tiny-test": dict(TINY_TEXT),
    "4b": {
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
    },
    "8b": {
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
    },
    "32b": {
        "hidden_size": 5120,
        "intermediate_size": 25600,
        "num_hidden_layers": 64,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 128,
    },
}

# Vision tower dimensions; out_hidden_size is the text hidden size it projects into.
VISION_SHAPES: dict[str, dict[str, Any]] = {
    "tiny-test": dict(TINY_VISION),
    "4b": {
        "depth": 24,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_heads": 16,
        "out_hidden_size": 2560,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [5, 11, 17],
    },
    "8b": {
        "depth": 27,
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_heads": 16,
        "out_hidden_size": 4096,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24],
    },
    "32b": {
        "depth": 27,
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_heads": 16,
        "out_hidden_size": 5120,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24],
    },
}

# The real vocabulary for real shapes; the CPU test shape keeps its embedding small.
VOCAB_SIZES: dict[str, int] = {
    "tiny-test": 1024,
    "4b": QWEN3_VL_VOCAB_SIZE,
    "8b": QWEN3_VL_VOCAB_SIZE,
    "32b": QWEN3_VL_VOCAB_SIZE,
}

SHAPES: tuple[str, ...] = tuple(TEXT_SHAPES)

# The tiny repo's tokenizer-side files, copied byte for byte into each random repo.
_VERBATIM_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def random_model_dir(
    shape: str,
    out_dir: Path,
    *,
    tokenizer_from: Path | None = None,
    device: str = "cuda",
    quantize: bool = True,
    svd_rank: int = 32,
    seed: int = 0,
) -> Path:
    """Save a random-weight Qwen3-VL of ``shape`` into ``out_dir`` as a loadable repo.

    ``shape`` is one of ``SHAPES``. The model is built in bf16 directly on ``device`` and,
    with ``quantize``, SDNQ-quantized there to uint4 + SVD of rank ``svd_rank``. The
    tokenizer and chat template come from ``tokenizer_from`` (a tiny-model repo) or, when
    that is None, from a tiny model built in a temporary directory; the processor gets
    Qwen3-VL's real image settings (patch 16, merge 2, 256x256 to 4096x4096 pixels).
    As in the tiny model, greedy decoding never emits EOS, so every caption is
    ``max_new_tokens`` long. Returns ``out_dir``.
    """
    import torch

    tf = untyped_transformers()

    if shape not in TEXT_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="tiny-tokenizer-") as scratch:
        source = tokenizer_from
        if source is None:
            from worker.devtools.tiny_model import build_tiny_model

            source = build_tiny_model(Path(scratch) / "tiny")
        borrowed = tf.AutoProcessor.from_pretrained(source)
        generation_config = tf.GenerationConfig.from_pretrained(source)
        # Kept verbatim: a tokenizer round-tripped through from_pretrained/save_pretrained
        # gains loader-only keys ("is_local", "local_files_only") in tokenizer_config.json.
        verbatim = {
            name: (Path(source) / name).read_bytes()
            for name in _VERBATIM_FILES
            if (Path(source) / name).is_file()
        }
    tokenizer = borrowed.tokenizer

    ids = special_token_ids(tokenizer)
    vocab_size = VOCAB_SIZES[shape]
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids, more than vocab_size {vocab_size}")
    # A fresh config per model: sdnq writes its quantization_config into this object.
    config = make_config(
        ids, vocab_size=vocab_size, text=TEXT_SHAPES[shape], vision=VISION_SHAPES[shape]
    )

    # Allocate and initialise in bf16 directly on the device: no fp32 copy and no host
    # round trip (32B is ~66 GB in bf16). fork_rng keeps the caller's RNG streams untouched.
    where = torch.device(device)
    devices = [where.index or 0] if where.type == "cuda" else []
    previous_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.bfloat16)
        try:
            with where:
                model = tf.Qwen3VLForConditionalGeneration(config).eval()
        finally:
            torch.set_default_dtype(previous_dtype)
        # As in the tiny model: greedy decoding only ever picks word-piece tokens, so a
        # caption always runs to max_new_tokens and timings do not hinge on an early EOS.
        shape_output_head(model.lm_head.weight, caption_token_ids(tokenizer))
        if quantize:
            from sdnq import sdnq_post_load_quant

            model = sdnq_post_load_quant(
                model,
                weights_dtype="uint4",
                use_svd=True,
                svd_rank=svd_rank,
                minimum_allowed_numel=0 if shape == "tiny-test" else 16384,
                quantization_device=device,
                return_device=device,
                torch_dtype=torch.bfloat16,
            )
            sort_quantization_lists(model.quantization_config)
            # The saved repo should load onto whatever device its user picks, as hub
            # checkpoints do, so the build device is not recorded.
            model.quantization_config.quantization_device = None
            model.quantization_config.return_device = None

    model.generation_config = generation_config
    model.save_pretrained(out_dir)
    # Same tokenizer and chat template, but the real processor's pixel limits, so image
    # token counts (and so timings) match the real model's.
    make_processor(
        tokenizer,
        image_size=REAL_IMAGE_SIZE,
        video_size=REAL_VIDEO_SIZE,
        chat_template=borrowed.chat_template,
    ).save_pretrained(out_dir)
    for name, data in verbatim.items():
        (out_dir / name).write_bytes(data)
    save_world_readable(out_dir)
    return out_dir
