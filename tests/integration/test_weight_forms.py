"""Weight forms on the real tiny SDNQ model: converted once at load, reported in provenance,
and captioning as the stored weights do."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sdnq")

from PIL import Image  # noqa: E402

from worker.contract import GenerationOptions  # noqa: E402
from worker.engine.base import PATCH_PIXELS  # noqa: E402
from worker.engine.hf_generate import GenerateEngine, load_engine  # noqa: E402
from worker.engine.weights import extra_bytes  # noqa: E402
from worker.settings import Settings  # noqa: E402

PIXELS = PATCH_PIXELS * 48


def settings(model_dir: Path, weights: str) -> Settings:
    return Settings(
        model=str(model_dir),
        dtype="float32",
        auto_download=False,
        max_pixels=PIXELS,
        min_pixels=PATCH_PIXELS * 4,
        weights=weights,  # type: ignore[arg-type]
    )


def caption(engine: GenerateEngine) -> str:
    image = Image.new("RGB", (120, 80), (30, 160, 90))
    item = engine.prepare(
        image,
        "Describe this image.",
        max_new_tokens=10,
        options=GenerationOptions(),
        max_pixels=PIXELS,
        min_pixels=PATCH_PIXELS * 4,
    )
    return engine.generate([item])[0].text


def weight_bytes(engine: GenerateEngine) -> int:
    tensors = [*engine.model.parameters(), *engine.model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture(scope="module")
def stored(tiny_model_dir: Path) -> GenerateEngine:
    return load_engine(settings(tiny_model_dir, "sdnq"))


def test_dequantized_weights_caption_exactly_as_the_stored_ones(
    tiny_model_dir: Path, stored: GenerateEngine
) -> None:
    expected_growth = extra_bytes(stored.model, "bf16", 4)
    dense = load_engine(settings(tiny_model_dir, "bf16"))
    assert caption(dense) == caption(stored)
    assert dense.info.provenance["quantization"]["served_as"] == "bf16"
    assert stored.info.provenance["quantization"]["served_as"] == "sdnq"
    # The fit check's estimate is what the conversion really added.
    assert weight_bytes(dense) - weight_bytes(stored) == pytest.approx(expected_growth, rel=0.02)


def test_int8_weights_are_requantized_smaller_than_dense_and_still_caption(
    tiny_model_dir: Path, stored: GenerateEngine
) -> None:
    from sdnq.layers import SDNQLinear

    int8 = load_engine(settings(tiny_model_dir, "int8"))
    layer = int8.model.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(layer, SDNQLinear)
    assert layer.sdnq_dequantizer.weights_dtype == "int8"
    assert int8.info.provenance["quantization"]["served_as"] == "int8"
    dense_growth = extra_bytes(stored.model, "bf16", 4)
    assert weight_bytes(int8) - weight_bytes(stored) < dense_growth / 2
    assert len(caption(int8).split()) > 0


class _OnGpu:
    """The stored model as check_fit sees it on a GPU: same layers, parameters on cuda:0."""

    def __init__(self, model: object) -> None:
        self._model = model

    def modules(self) -> object:
        return self._model.modules()  # type: ignore[attr-defined]

    def parameters(self) -> object:
        class Param:
            device = torch.device("cuda:0")

        return iter([Param()])


def test_a_form_that_does_not_fit_the_gpu_is_refused_naming_need_and_alternatives(
    stored: GenerateEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.engine.weights import check_fit
    from worker.errors import ConfigError

    free = 64 * 2**20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))
    on_gpu = _OnGpu(stored.model)
    with pytest.raises(ConfigError) as refused:
        check_fit(on_gpu, "bf16", 2, reserve_bytes=2 * 2**30)
    message = str(refused.value)
    assert "CAPTION_WEIGHTS=bf16 needs 2.0 GiB more on cuda:0" in message
    assert "0.1 GiB is free" in message
    assert "CAPTION_WEIGHTS=int8" in message and "sdnq" in message
    check_fit(on_gpu, "bf16", 2, reserve_bytes=0)  # the tiny model itself fits in 64 MiB
    check_fit(on_gpu, "sdnq", 2, reserve_bytes=2**40)  # as stored: nothing to convert


def test_a_refused_weight_form_stops_loading_with_its_own_message(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fit check's ConfigError reaches the worker as is, not wrapped as a load error."""
    import worker.engine.loading as loading
    from worker.errors import ConfigError

    def refuse(*_: object) -> None:
        raise ConfigError("CAPTION_WEIGHTS=bf16 needs 99.0 GiB more on cuda:0")

    monkeypatch.setattr(loading, "check_fit", refuse)
    with pytest.raises(ConfigError, match=r"needs 99\.0 GiB more"):
        load_engine(settings(tiny_model_dir, "bf16"))
