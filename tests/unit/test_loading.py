"""Model loading without a model: placement per memory mode, and failures named clearly."""

from __future__ import annotations

from typing import Any

import pytest

from worker.engine.loading import load_model, placement
from worker.errors import ModelLoadError
from worker.settings import Settings


def test_memory_modes_place_the_model() -> None:
    assert placement(Settings(memory_mode="gpu"), cuda_available=True) == (
        "cuda:0",
        {"device_map": {"": "cuda:0"}},
    )
    assert placement(Settings(memory_mode="gpu", device="cuda:1"), True) == (
        "cuda:1",
        {"device_map": {"": "cuda:1"}},
    )
    assert placement(Settings(memory_mode="balanced"), True) == ("cuda:0", {"device_map": "auto"})
    # lowvram keeps weights in CPU RAM; load_model then streams them with accelerate.
    assert placement(Settings(memory_mode="lowvram"), True) == (
        "cuda:0",
        {"device_map": {"": "cpu"}},
    )
    assert placement(Settings(memory_mode="balanced"), cuda_available=False) == (
        "cpu",
        {"device_map": {"": "cpu"}},
    )


def test_out_of_memory_while_loading_names_the_memory_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    calls: list[str] = []

    def out_of_memory(source: str, **_: Any) -> Any:
        calls.append(source)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", out_of_memory)
    settings = Settings(model="some-owner/some-big-vl-model", memory_mode="gpu")

    with pytest.raises(ModelLoadError) as caught:
        load_model(settings)

    message = str(caught.value)
    assert calls == ["some-owner/some-big-vl-model"]
    assert "out of memory loading some-owner/some-big-vl-model" in message
    assert "memory_mode=gpu" in message
    assert "CAPTION_MEMORY_MODE=balanced or lowvram" in message
    assert "Tried to allocate 20.00 GiB" in message
