"""The real Qwen3-VL shapes the random-weight repos are built in (no model is built here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.devtools.shapes import SHAPES, TEXT_SHAPES, VISION_SHAPES, random_model_dir


def test_real_shapes_are_consistent() -> None:
    assert {"4b", "8b", "32b", "tiny-test"} <= set(SHAPES)
    for shape in SHAPES:
        text, vision = TEXT_SHAPES[shape], VISION_SHAPES[shape]
        assert vision["out_hidden_size"] == text["hidden_size"]
        assert max(vision["deepstack_visual_indexes"]) < vision["depth"]
        assert text["num_attention_heads"] % text["num_key_value_heads"] == 0


def test_random_model_dir_rejects_unknown_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown shape"):
        random_model_dir("7b", tmp_path, device="cpu")
    assert not any(tmp_path.iterdir())  # refused before writing anything
