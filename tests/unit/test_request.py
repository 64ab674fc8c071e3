from __future__ import annotations

from typing import Any

import pytest

from worker.errors import InvalidRequest
from worker.request import GenerationOptions, parse_request
from worker.settings import Settings

SETTINGS = Settings(max_prompt_chars=100, max_new_tokens_limit=256, max_pixels=500_000)


def test_defaults_follow_the_contract() -> None:
    request = parse_request({"image": "s3://photos/cat.jpg"}, Settings())
    assert request.prompt == "Describe this image."
    assert request.max_new_tokens == 512
    assert request.options == GenerationOptions()
    assert request.options.generate_kwargs()["do_sample"] is False


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
    ],
)
def test_bad_arguments_are_invalid_requests(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request(kwargs, SETTINGS)
    assert needle in str(info.value)
