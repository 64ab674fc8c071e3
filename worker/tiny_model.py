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

# Qwen's special tokens in Qwen's own id order, so the tiny ids keep the real relative layout.
_SPECIAL_NAMES = (
    "endoftext im_start im_end object_ref_start object_ref_end box_start box_end quad_start"
    " quad_end vision_start vision_end vision_pad image_pad video_pad"
)
SPECIAL_TOKENS: tuple[str, ...] = tuple(f"<|{name}|>" for name in _SPECIAL_NAMES.split())

# Qwen2's pre-tokenizer split (the same regex transformers' Qwen2Tokenizer uses).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The shape of the real Qwen3-VL chat template (no tools, no thinking): each turn is
# <|im_start|>role\n...<|im_end|>\n and each image part becomes the vision placeholder
# that the processor expands to one <|image_pad|> per merged 32x32 patch.
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- set video_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content['type'] == 'video' or 'video' in content -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content -%}{{- content['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# The BPE's training text: short caption-like English, enough for a few hundred merges.
CORPUS: tuple[str, ...] = (
    "A photo of a small brown dog sitting on the green grass in a sunny park.",
    "Two people are walking along the beach at sunset, holding hands near the water.",
    "A red car is parked on the side of a quiet street lined with tall trees.",
    "The image shows a bowl of fresh fruit on a wooden kitchen table. A cat is sleeping.",
    "There is a mountain covered with snow under a clear blue sky, next to a window.",
    "A group of children are playing football on a field after school, with white curtains.",
    "An old stone bridge crosses a river in the middle of a green forest at night.",
    "The picture shows a city skyline with bright lights and tall buildings in the morning.",
    "A woman in a yellow dress is reading a book in the garden. A man is riding a bicycle.",
    "A plate with a sandwich, some salad and a glass of orange juice on the office desk.",
    "This is a close-up of a flower with pink petals and a yellow center, a bird, a tree.",
    "The sign on the wall says: Open daily from 9 to 5, closed on Sundays. Three horses.",
)

# At most 256 byte symbols + 192 merges; this corpus yields ~360 (a merge needs 2+ uses).
BPE_VOCAB_SIZE = 448
VOCAB_MULTIPLE = 64  # real Qwen checkpoints pad the embedding past the tokenizer too

# Tiny processor budget: 4 to 256 merged 32x32 tokens per image keeps CPU tests fast.
TINY_IMAGE_SIZE = {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 256}
TINY_VIDEO_SIZE = {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 256}
# The released Qwen3-VL preprocessor_config.json / video_preprocessor_config.json limits.
REAL_IMAGE_SIZE = {"shortest_edge": 65536, "longest_edge": 16777216}
REAL_VIDEO_SIZE = {"shortest_edge": 4096, "longest_edge": 25165824}

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


def untyped_transformers() -> Any:
    """The ``transformers`` module, typed ``Any``.

    Its partial type hints reject calls that work and that this module relies on (BPE
    merges as tuples, ``unk_token=None``, untyped constructors), so calls go through this.
    """
    import transformers

    return transformers


def build_tokenizer() -> Any:
    """Train the tiny byte-level BPE and wrap it as a transformers ``Qwen2Tokenizer``.

    The special tokens sit right after the BPE entries, in Qwen's order; ``eos`` is
    ``<|im_end|>`` and ``pad`` is ``<|endoftext|>`` as in the real Qwen3-VL tokenizer.
    """
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tf = untyped_transformers()

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        # Every byte gets a symbol, so any text (and any generated id) round-trips.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(state["vocab"])
    # tokenizers serializes merges as [left, right] pairs; its BPE constructor wants tuples.
    merges = [tuple(m.split(" ", 1) if isinstance(m, str) else m) for m in state["merges"]]
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = tf.Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    # Registering them as special makes the tokenizer match them whole and lets
    # decode(skip_special_tokens=True) drop them; their ids already exist in the vocab.
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [tf.AddedToken(t, special=True) for t in SPECIAL_TOKENS]}
    )
    return tokenizer


def make_processor(
    tokenizer: Any,
    *,
    image_size: dict[str, int],
    video_size: dict[str, int],
    chat_template: str = CHAT_TEMPLATE,
) -> Any:
    """A ``Qwen3VLProcessor`` with Qwen3-VL's vision settings (patch 16, merge 2, t-patch 2)."""
    tf = untyped_transformers()

    vision: dict[str, Any] = {
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    return tf.Qwen3VLProcessor(
        image_processor=tf.Qwen2VLImageProcessor(size=dict(image_size), **vision),
        tokenizer=tokenizer,
        video_processor=tf.Qwen3VLVideoProcessor(size=dict(video_size), **vision),
        chat_template=chat_template,
    )


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """The ids a Qwen3-VL config and generation config need, read from ``tokenizer``."""
    ids = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS}
    return {
        "pad": ids["<|endoftext|>"],
        "eos": ids["<|im_end|>"],
        "image": ids["<|image_pad|>"],
        "video": ids["<|video_pad|>"],
        "vision_start": ids["<|vision_start|>"],
        "vision_end": ids["<|vision_end|>"],
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


def caption_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the plain ASCII word pieces (``"The"``, ``" field"``, ``"ing"``) in ``tokenizer``.

    The tiny model's output head only ever favours these, so its gibberish captions are
    readable, valid UTF-8 and free of control bytes.
    """
    words: list[int] = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if text.isascii() and text.strip().isalpha() and not text.startswith("<|"):
            words.append(token_id)
    return words


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
