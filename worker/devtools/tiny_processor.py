"""The tiny model's tokenizer and processor: a byte-level BPE with Qwen's special tokens,
the Qwen3-VL chat template and a ``Qwen3VLProcessor``, built offline in about a second.

Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

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
