"""The engine on the tiny model, loaded through the production path."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from worker.contract import GenerationOptions
from worker.engine.hf_generate import GenerateEngine, load_engine
from worker.settings import Settings


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> GenerateEngine:
    return load_engine(Settings(model=str(tiny_model_dir), dtype="float32", auto_download=False))


def _prepare(engine: GenerateEngine, prompt: str, size: tuple[int, int] = (64, 48)):  # type: ignore[no-untyped-def]
    return engine.prepare(
        Image.new("RGB", size, (10, 200, 30)),
        prompt,
        max_new_tokens=6,
        options=GenerationOptions(),
        max_pixels=1 << 20,
        min_pixels=4096,
    )


def test_loads_sdnq_weights_and_reports_provenance(
    engine: GenerateEngine, tiny_model_dir: Path
) -> None:
    info = engine.info
    assert info.name == str(tiny_model_dir.resolve())
    assert info.resolved.is_local and info.resolved.source == info.name
    assert engine.info.device == "cpu"
    assert info.provenance["device"] == "cpu" and info.provenance["dtype"] == "float32"
    assert info.provenance["revision"] is None  # a local directory has no hub revision
    quant = info.provenance["quantization"]
    assert quant == {
        "quant_method": "sdnq",
        "weights_dtype": "uint4",
        "use_svd": True,
        "svd_rank": 8,
        "served_as": "sdnq",  # CAPTION_WEIGHTS: as stored
    }
    layer = engine.model.model.language_model.layers[0].mlp.up_proj
    assert type(layer).__name__ != "Linear"  # an SDNQ layer, not a plain nn.Linear
    assert set(info.provenance["versions"]) >= {"torch", "transformers", "sdnq"}


def test_warm_up_answers_with_one_token(engine: GenerateEngine) -> None:
    out = engine.warm_up()
    assert out.generated_tokens == 1 and out.finish_reason == "length"


def test_prepare_is_safe_from_many_threads(engine: GenerateEngine) -> None:
    prompts = [f"Describe picture {i} in detail." for i in range(64)]
    alone = [_prepare(engine, p).tensors["input_ids"].tolist() for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        threaded = list(
            pool.map(lambda p: _prepare(engine, p).tensors["input_ids"].tolist(), prompts)
        )
    assert threaded == alone


def test_expired_deadline_stops_the_row_as_timeout(engine: GenerateEngine) -> None:
    import time

    item = _prepare(engine, "Describe.")
    [out] = engine.generate([item], [time.monotonic() - 1])
    assert out.finish_reason == "timeout"
    assert out.generated_tokens <= 1


def test_out_of_memory_is_recognised(engine: GenerateEngine) -> None:
    assert issubclass(torch.cuda.OutOfMemoryError, engine.oom_errors)
