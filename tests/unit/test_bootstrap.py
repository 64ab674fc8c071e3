"""Choosing the engine and runner from settings, with fake engine factories."""

from __future__ import annotations

import pytest

from tests.support.fake_engine import FakeEngine
from worker.batching.batcher import Batcher
from worker.errors import ConfigError
from worker.runtime.bootstrap import build_runtime, load_engine
from worker.settings import Settings

FAKE = "tests.support.fake_engine:load_fake_engine"


def test_slots_refuse_a_factory_whose_engine_cannot_be_wrapped() -> None:
    settings = Settings(engine="slots", engine_factory=FAKE)
    with pytest.raises(ConfigError) as refused:
        load_engine(settings)
    assert "CAPTION_ENGINE=slots" in str(refused.value)
    assert FAKE in str(refused.value)


def test_generate_uses_the_factory_engine_behind_the_batcher() -> None:
    runtime = build_runtime(Settings(engine="generate", engine_factory=FAKE, max_batch=5), "test")
    assert isinstance(runtime.engine, FakeEngine)
    assert isinstance(runtime.runner, Batcher)
    assert runtime.runner.batch_cap == 5


def test_a_factory_engine_the_default_slots_cannot_wrap_serves_whole_batches() -> None:
    # CAPTION_ENGINE unset: a custom factory written for whole batches keeps working.
    runtime = build_runtime(Settings(engine_factory=FAKE, max_batch=5), "test")
    assert isinstance(runtime.engine, FakeEngine)
    assert isinstance(runtime.runner, Batcher)
