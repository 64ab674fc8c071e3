from __future__ import annotations

from pathlib import Path

import pytest

from worker.engine.catalogue import CATALOGUE, resolve_model, text_models
from worker.errors import ConfigError

DEFAULT_REPO = "Disty0/Qwen3-VL-32B-Instruct-SDNQ-uint4-svd-r32"


def test_catalogue_rows_have_the_note_shape() -> None:
    for entry in CATALOGUE:
        assert entry.output_type in ("text", "image")
        assert entry.repo_id.count("/") == 1
        assert entry.description and entry.quant_level and entry.type


def test_default_model_is_the_32b_sdnq_captioner() -> None:
    resolved = resolve_model("Qwen3-VL-32B-Instruct-SDNQ-uint4")
    assert resolved.source == DEFAULT_REPO
    assert not resolved.is_local
    assert text_models()[0].repo_id == DEFAULT_REPO


def test_repo_id_of_a_catalogue_entry_resolves_to_that_entry() -> None:
    resolved = resolve_model(DEFAULT_REPO)
    assert resolved.name == "Qwen3-VL-32B-Instruct-SDNQ-uint4"
    assert resolved.matches(DEFAULT_REPO) and resolved.matches(resolved.name)
    assert not resolved.matches("someone/else")


def test_image_generation_models_are_refused() -> None:
    image_model = next(e for e in CATALOGUE if e.output_type == "image")
    with pytest.raises(ConfigError, match="text-output"):
        resolve_model(image_model.name)
    with pytest.raises(ConfigError, match="text-output"):
        resolve_model(image_model.repo_id)


def test_unknown_repo_id_passes_through_for_the_hub() -> None:
    resolved = resolve_model("acme/qwen3-vl-finetune")
    assert resolved.source == "acme/qwen3-vl-finetune" and resolved.entry is None


def test_local_directory_is_a_custom_model_path(tmp_path: Path) -> None:
    resolved = resolve_model(str(tmp_path))
    assert resolved.is_local and resolved.source == str(tmp_path.resolve())


@pytest.mark.parametrize(
    "spec", ["", "  ", "./missing-dir", "/no/such/dir", "just-a-word", "a/b/c"]
)
def test_unusable_specs_are_config_errors(spec: str) -> None:
    with pytest.raises(ConfigError, match="CAPTION_MODEL"):
        resolve_model(spec)


def test_docs_list_every_failure_name_producers_can_see() -> None:
    from worker.errors import PRODUCER_VISIBLE

    root = Path(__file__).resolve().parents[2]
    contract = (root / "docs" / "contract.md").read_text()
    readme = (root / "README.md").read_text()
    for error in PRODUCER_VISIBLE:
        assert f"| `{error.__name__}` |" in contract, error.__name__  # the failure table
        assert f"`{error.__name__}`" in readme, error.__name__  # the README's short list
