"""The task contract: request parsing with defaults and limits, and the result's JSON shape."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.pinned import KEYS as RESULT_KEYS
from worker.contract import (
    DEFAULT_MAX_NEW_TOKENS,
    TASK_NAME,
    CaptionResult,
    GenerationOptions,
    parse_request,
)
from worker.errors import InvalidRequest
from worker.settings import Settings

SETTINGS = Settings(max_prompt_chars=100, max_new_tokens_limit=256, max_pixels=500_000)
# Distinctive limits, so a number in a message can only be the limit.
MAX_PROMPT_CHARS = 173
MAX_NEW_TOKENS_LIMIT = 61


def test_defaults_follow_the_contract() -> None:
    request = parse_request({"image": "s3://photos/cat.jpg"}, Settings())
    assert request.prompt == "Describe this image."
    assert request.max_new_tokens == 512
    assert request.options == GenerationOptions()
    assert request.options.generate_kwargs()["do_sample"] is False
    assert TASK_NAME == "caption"


def test_sampling_options_are_kept_and_greedy_drops_the_seed() -> None:
    sampled = parse_request(
        {"image": "s3://p/k", "do_sample": True, "temperature": 0.7, "top_p": 0.9, "seed": 7},
        SETTINGS,
    )
    assert sampled.options.seed == 7
    assert sampled.options.generate_kwargs() == {
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
    }
    greedy = parse_request({"image": "s3://p/k", "seed": 7}, SETTINGS)
    assert greedy.options == GenerationOptions()


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"image": "s3://p/k", "colour": "red"}, "unknown argument 'colour'"),
        ({"image": "s3://p/k", "max_new_tokens": "12"}, "max_new_tokens"),
        ({"image": "s3://p/k", "max_new_tokens": 12.0}, "max_new_tokens"),
        ({"image": "s3://p/k", "max_new_tokens": True}, "max_new_tokens"),
        ({"image": "s3://p/k", "max_new_tokens": 0}, "max_new_tokens"),
        ({"image": "s3://p/k", "max_new_tokens": 257}, "limit of 256"),
        ({"image": "s3://p/k", "prompt": "x" * 101}, "limit is 100"),
        ({"image": "s3://p/k", "prompt": "   "}, "prompt is empty"),
        ({"image": "s3://p/k", "temperature": 0}, "temperature"),
        ({"image": "s3://p/k", "top_p": 1.5}, "top_p"),
        ({"image": "s3://p/k", "max_pixels": 600_000}, "limit of 500000"),
        ({"image": 3}, "image"),
        ({}, "image"),
        ({"image": None}, "image"),
        ({"image": None, "prompt": "Describe."}, "image"),
    ],
)
def test_bad_arguments_are_invalid_requests(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request(kwargs, SETTINGS)
    assert needle in str(info.value)


# --- JSON null means "not given" ---------------------------------------------------------------


def test_null_for_every_optional_argument_means_its_default() -> None:
    settings = Settings()
    nulls = {
        "prompt": None,
        "max_new_tokens": None,
        "model": None,
        "do_sample": None,
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "repetition_penalty": None,
        "seed": None,
        "max_pixels": None,
    }
    given = parse_request({"image": "s3://p/k", **nulls}, settings)
    assert given == parse_request({"image": "s3://p/k"}, settings)


def test_null_prompt_is_the_default_prompt() -> None:
    settings = Settings(default_prompt="Write a caption.")
    request = parse_request({"image": "s3://p/k", "prompt": None}, settings)
    assert request.prompt == "Write a caption."


def test_null_do_sample_is_greedy() -> None:
    request = parse_request({"image": "s3://p/k", "do_sample": None, "seed": 3}, SETTINGS)
    assert request.options == GenerationOptions()
    assert request.options.generate_kwargs()["do_sample"] is False


def test_null_max_new_tokens_is_the_default_within_the_limit() -> None:
    request = parse_request({"image": "s3://p/k", "max_new_tokens": None}, Settings())
    assert request.max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    # A worker whose limit is below the default answers with its limit, not an error.
    capped = parse_request({"image": "s3://p/k", "max_new_tokens": None}, SETTINGS)
    assert capped.max_new_tokens == 256


# --- Request limits ----------------------------------------------------------------------------


def _limits() -> Settings:
    return Settings(max_prompt_chars=MAX_PROMPT_CHARS, max_new_tokens_limit=MAX_NEW_TOKENS_LIMIT)


def test_prompt_at_the_limit_is_accepted() -> None:
    prompt = "é" * MAX_PROMPT_CHARS  # characters, not UTF-8 bytes, are counted
    request = parse_request({"image": "s3://bkt/k.png", "prompt": prompt}, _limits())
    assert request.prompt == prompt


@pytest.mark.parametrize("length", [MAX_PROMPT_CHARS + 1, 1_000_000])
def test_prompt_over_the_limit_is_invalid_and_names_the_limit(length: int) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request({"image": "s3://bkt/k.png", "prompt": "x" * length}, _limits())
    message = str(caught.value)
    assert "prompt" in message
    assert str(MAX_PROMPT_CHARS) in message
    assert len(message) < 300  # the prompt is not echoed into results and logs


def test_max_new_tokens_at_the_limit_is_accepted() -> None:
    kwargs = {"image": "s3://bkt/k.png", "max_new_tokens": MAX_NEW_TOKENS_LIMIT}
    assert parse_request(kwargs, _limits()).max_new_tokens == MAX_NEW_TOKENS_LIMIT


@pytest.mark.parametrize("tokens", [MAX_NEW_TOKENS_LIMIT + 1, 2**31])
def test_max_new_tokens_over_the_limit_is_invalid_and_names_the_limit(tokens: int) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request({"image": "s3://bkt/k.png", "max_new_tokens": tokens}, _limits())
    message = str(caught.value)
    assert "max_new_tokens" in message
    assert str(MAX_NEW_TOKENS_LIMIT) in message


# --- The result --------------------------------------------------------------------------------


def _result() -> CaptionResult:
    return CaptionResult(
        text="a red square",
        model="tiny",
        image="s3://p/k.png",
        prompt_tokens=103,
        generated_tokens=12,
        finish_reason="length",
        seconds=0.1234,
        batch_size=1,
        worker="caption@host/1",
        image_size=(96, 64),
        model_image_size=(320, 224),
        model_revision=None,
        quantization={"quant_method": "sdnq"},
        dtype="float32",
        versions={"torch": "2"},
        model_loaded_at=1.5,
    )


def test_result_json_keeps_the_contract_key_order_and_plain_lists() -> None:
    out = _result().to_json()
    assert list(out) == RESULT_KEYS
    assert out["image_size"] == [96, 64] and type(out["image_size"]) is list
    assert out["model_image_size"] == [320, 224] and type(out["model_image_size"]) is list
    # What a producer reads back from the JSON result backend is the same object.
    assert json.loads(json.dumps(out)) == out
    assert list(json.loads(json.dumps(out))) == RESULT_KEYS
