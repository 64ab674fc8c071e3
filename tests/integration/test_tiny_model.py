"""The tiny SDNQ Qwen3-VL repo and the random real-shape repos load and caption like real ones."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")  # conftest sets it too; keep it standalone

torch = pytest.importorskip("torch")
pytest.importorskip("sdnq")
transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from worker.devtools.shapes import random_model_dir  # noqa: E402
from worker.devtools.tiny_model import build_tiny_model  # noqa: E402
from worker.devtools.tiny_processor import SPECIAL_TOKENS  # noqa: E402

REPO_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "processor_config.json",
)


def load(repo: Path) -> tuple[Any, Any]:
    """Load a repo the way the worker does: plain Auto classes after ``import sdnq``."""
    import sdnq  # noqa: F401  (registers quant_method "sdnq" with transformers)

    processor = transformers.AutoProcessor.from_pretrained(repo)
    model = transformers.AutoModelForImageTextToText.from_pretrained(repo, dtype=torch.float32)
    return model.eval(), processor


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A small deterministic noise picture."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def caption_ids(model: Any, processor: Any, image: Image.Image, new_tokens: int) -> list[int]:
    """Greedy caption token ids for one image, prompt trimmed."""
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe."}],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    ids: list[int] = out[0, inputs["input_ids"].shape[1] :].tolist()
    return ids


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> tuple[Any, Any]:
    """The session's tiny repo (conftest builds it once), loaded once for this module."""
    return load(tiny_model_dir)


def test_repo_has_hub_layout(tiny_model_dir: Path) -> None:
    for name in REPO_FILES:
        assert (tiny_model_dir / name).is_file(), name
    # Small enough to build per test session and to ship in a container image.
    total = sum(p.stat().st_size for p in tiny_model_dir.iterdir())
    assert total < 3 * 2**20


def test_config_says_sdnq_uint4_svd(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "sdnq"
    assert quant["weights_dtype"] == "uint4"
    assert quant["use_svd"] is True
    assert config["model_type"] == "qwen3_vl"
    assert config["vision_config"]["patch_size"] == 16


def test_generation_config_stops_at_qwen_eos(loaded: tuple[Any, Any]) -> None:
    model, processor = loaded
    tok = processor.tokenizer
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    gen = model.generation_config
    assert list(gen.eos_token_id) == [im_end, endoftext]
    assert gen.pad_token_id == endoftext
    assert gen.do_sample is False
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"


def test_processor_is_qwen3_vl_with_small_budget(loaded: tuple[Any, Any]) -> None:
    model, processor = loaded
    assert type(processor).__name__ == "Qwen3VLProcessor"
    image_processor = processor.image_processor
    assert type(image_processor).__name__ == "Qwen2VLImageProcessor"
    assert (image_processor.patch_size, image_processor.merge_size) == (16, 2)
    assert image_processor.temporal_patch_size == 2
    assert image_processor.size.longest_edge == 32 * 32 * 256
    tok = processor.tokenizer
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert len(tok) <= model.config.text_config.vocab_size
    for token in SPECIAL_TOKENS:  # each special token is one id, matched whole
        assert len(tok(token)["input_ids"]) == 1


def test_chat_template_has_qwen3_vl_shape(loaded: tuple[Any, Any]) -> None:
    _, processor = loaded
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_linear_layers_are_sdnq(loaded: tuple[Any, Any]) -> None:
    from sdnq.layers import SDNQLayer

    model, _ = loaded
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = {n for n, m in linears.items() if isinstance(m, SDNQLayer)}
    # sdnq keeps lm_head in full precision by design (one of its skip keys).
    assert set(linears) - quantized == {"lm_head"}
    assert any(n.startswith("model.visual.") for n in quantized)
    assert any(n.startswith("model.language_model.") for n in quantized)


def test_greedy_caption_is_text_not_eos(loaded: tuple[Any, Any]) -> None:
    model, processor = loaded
    specials = set(processor.tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)))
    captions = set()
    for seed, (width, height) in enumerate([(48, 48), (96, 40), (40, 130)]):
        ids = caption_ids(model, processor, picture(width, height, seed), new_tokens=8)
        assert len(ids) == 8  # never stops early: EOS cannot win by construction
        assert not specials & set(ids)
        text = processor.decode(ids, skip_special_tokens=True)
        assert text.strip() and text.isascii()
        captions.add(text)
    assert len(captions) > 1  # the caption depends on the image


def test_same_seed_same_files_and_caption(
    tiny_model_dir: Path, loaded: tuple[Any, Any], tmp_path: Path
) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    for name in REPO_FILES:
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    image = picture(64, 64, seed=7)
    model, processor = loaded
    model2, processor2 = load(again)
    assert caption_ids(model, processor, image, 8) == caption_ids(model2, processor2, image, 8)


def test_other_seed_other_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path / "other", seed=1)
    weights = "model.safetensors"
    assert (other / weights).read_bytes() != (tiny_model_dir / weights).read_bytes()


def test_random_model_dir_tiny_test_loads_and_captions(tmp_path: Path) -> None:
    repo = random_model_dir("tiny-test", tmp_path / "rand", device="cpu")
    config = json.loads((repo / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "sdnq"
    assert config["quantization_config"]["svd_rank"] == 32
    assert config["quantization_config"]["quantization_device"] is None
    model, processor = load(repo)
    assert type(processor).__name__ == "Qwen3VLProcessor"
    # The real Qwen3-VL pixel limits, not the tiny model's CPU budget.
    assert processor.image_processor.size.shortest_edge == 65536
    assert processor.image_processor.size.longest_edge == 16777216
    assert type(model.model.language_model.layers[0].mlp.up_proj).__name__ == "SDNQLinear"
    ids = caption_ids(model, processor, picture(64, 64, seed=3), new_tokens=4)
    assert len(ids) == 4
    assert processor.decode(ids, skip_special_tokens=True).strip()
