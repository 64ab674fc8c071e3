"""The config hash of a bulk run: stable across processes, sensitive to what steers the model."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from worker.bulk.identity import RunConfig, canonical_json, config_hash
from worker.errors import InvalidRequest
from worker.settings import Settings

SETTINGS = Settings(model="acme/qwen3-vl-sdnq", revision=None)


def run_config(settings: Settings = SETTINGS, **arguments: Any) -> RunConfig:
    return RunConfig.from_arguments(settings, arguments)


def test_the_hash_is_16_hex_digits_of_the_canonical_json() -> None:
    config = run_config()
    assert len(config.config_hash) == 16
    int(config.config_hash, 16)
    assert config.config_hash == config_hash(config.to_json())
    assert config.to_json() == {
        "model": "acme/qwen3-vl-sdnq",
        "revision": None,
        "prompt": "Describe this image.",
        "max_new_tokens": 512,
        "generation": {
            "do_sample": False,
            "temperature": None,
            "top_p": None,
            "top_k": None,
            "repetition_penalty": None,
            "seed": None,
        },
        "max_pixels": 1_048_576,
    }


def test_the_hash_is_pinned() -> None:
    # Earlier runs' outputs are matched by this value: changing how it is computed makes
    # every new run caption everything again. Change it only on purpose.
    assert run_config().config_hash == "ff05df971a443e62"


def test_the_hash_is_the_same_in_another_process() -> None:
    # No dict order, set order or hash randomisation may leak into it.
    code = (
        "from worker.bulk.identity import RunConfig; from worker.settings import Settings; "
        "print(RunConfig.from_arguments(Settings(model='acme/qwen3-vl-sdnq', revision=None),"
        " {}).config_hash)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    )
    assert out.stdout.strip() == run_config().config_hash


def test_canonical_json_ignores_key_order_and_keeps_unicode() -> None:
    assert canonical_json({"b": 1, "a": "猫"}) == canonical_json({"a": "猫", "b": 1})
    assert canonical_json({"a": "猫"}) == '{"a":"猫"}'.encode()


@pytest.mark.parametrize(
    ("settings", "arguments"),
    [
        (SETTINGS.model_copy(update={"model": "acme/other"}), {}),
        (SETTINGS.model_copy(update={"revision": "abc123"}), {}),
        (SETTINGS, {"prompt": "Describe this image in one sentence."}),
        (SETTINGS, {"prompt": "Describe this image. "}),  # one space is another prompt
        (SETTINGS, {"max_new_tokens": 256}),
        (SETTINGS, {"do_sample": True}),
        (SETTINGS, {"do_sample": True, "temperature": 0.7}),
        (SETTINGS, {"repetition_penalty": 1.1}),
        (SETTINGS, {"max_pixels": 512 * 512}),
        (SETTINGS.model_copy(update={"default_prompt": "What is this?"}), {}),
    ],
)
def test_anything_that_steers_the_model_changes_the_hash(
    settings: Settings, arguments: dict[str, Any]
) -> None:
    assert run_config(settings, **arguments).config_hash != run_config().config_hash


def test_what_does_not_steer_the_model_keeps_the_hash() -> None:
    base = run_config().config_hash
    # Explicit defaults, a seed without sampling (dropped, as for tasks), unrelated settings.
    assert run_config(prompt="Describe this image.", max_new_tokens=512).config_hash == base
    assert run_config(seed=7).config_hash == base
    assert run_config(SETTINGS.model_copy(update={"max_batch": 4})).config_hash == base


def test_an_item_override_is_hashed_into_the_item_config() -> None:
    config = run_config()
    assert config.item_config(None, None) == config.config_hash
    # Overriding with the run's own values is the same caption, so the same config.
    assert config.item_config("Describe this image.", 512) == config.config_hash
    short = config.item_config(None, 64)
    other = config.item_config("Name the animal.", None)
    assert len({short, other, config.config_hash}) == 3
    assert short == run_config(max_new_tokens=64).config_hash
    assert other == run_config(prompt="Name the animal.").config_hash


@pytest.mark.parametrize(
    "arguments",
    [{"max_new_tokens": 0}, {"max_new_tokens": 10**6}, {"prompt": "  "}, {"top_p": 2.0}],
)
def test_invalid_generation_arguments_are_refused_as_for_tasks(
    arguments: dict[str, Any],
) -> None:
    with pytest.raises(InvalidRequest):
        run_config(**arguments)


def test_the_run_records_the_model_as_the_worker_names_it(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    # A relative directory: the worker reports its absolute path, and items must match it.
    local = RunConfig.from_arguments(Settings(model="models/tiny"), {})
    assert local.model == str((tmp_path / "models" / "tiny").resolve())
    # A catalogue repo id and its entry name are one model, with one config hash.
    by_repo = RunConfig.from_arguments(
        Settings(model="Disty0/Qwen3-VL-32B-Instruct-SDNQ-uint4-svd-r32"), {}
    )
    by_name = RunConfig.from_arguments(Settings(model="Qwen3-VL-32B-Instruct-SDNQ-uint4"), {})
    assert by_repo.model == by_name.model == "Qwen3-VL-32B-Instruct-SDNQ-uint4"
    assert by_repo.config_hash == by_name.config_hash
    # A path that only exists on the workers is recorded as given.
    remote = RunConfig.from_arguments(Settings(model="/models/on-the-gpu-hosts"), {})
    assert remote.model == "/models/on-the-gpu-hosts"
