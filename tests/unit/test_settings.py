from __future__ import annotations

import pytest

from worker.errors import ConfigError
from worker.settings import Settings, load_settings


def test_defaults_point_at_local_redis_and_the_catalogue_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("CAPTION_BROKER_URL", "CAPTION_RESULT_BACKEND", "CAPTION_MODEL"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.broker_url.startswith("redis://127.0.0.1:6379")
    assert settings.result_backend.startswith("redis://127.0.0.1:6379")
    assert settings.model == "Qwen3-VL-32B-Instruct-SDNQ-uint4"
    assert settings.queue == "captions"
    assert settings.task_threads == settings.max_batch + 4


def test_environment_values_are_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTION_MAX_BATCH", "16")
    monkeypatch.setenv("CAPTION_AUTO_DOWNLOAD", "false")
    monkeypatch.setenv("CAPTION_ALLOWED_BUCKETS", " photos , thumbs,,")
    monkeypatch.setenv("CAPTION_DTYPE", "float16")
    settings = load_settings()
    assert settings.max_batch == 16
    assert settings.auto_download is False
    assert settings.allowed_buckets == ("photos", "thumbs")
    assert settings.dtype == "float16"


@pytest.mark.parametrize(
    "name, value",
    [
        ("CAPTION_MAX_BATCH", "abc"),
        ("CAPTION_MAX_BATCH", "0"),
        ("CAPTION_DTYPE", "int3"),
        ("CAPTION_MEMORY_MODE", "turbo"),
        ("CAPTION_AUTO_DOWNLOAD", "perhaps"),
        ("CAPTION_TASK_DEADLINE_S", "-1"),
    ],
)
def test_invalid_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert name in str(info.value)


def test_min_pixels_above_max_pixels_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTION_MIN_PIXELS", "2000000")
    monkeypatch.setenv("CAPTION_MAX_PIXELS", "1000000")
    with pytest.raises(ConfigError, match="CAPTION_MIN_PIXELS"):
        load_settings()


def test_visibility_timeout_must_exceed_deadline_grace_and_margin() -> None:
    short = Settings(task_deadline_s=600, visibility_margin_s=60, visibility_timeout_s=665)
    with pytest.raises(ConfigError, match="CAPTION_VISIBILITY_TIMEOUT_S"):
        short.check_visibility_timeout()
    Settings(
        task_deadline_s=600, visibility_margin_s=60, visibility_timeout_s=666
    ).check_visibility_timeout()


def test_visibility_timeout_is_not_checked_for_other_brokers() -> None:
    amqp = Settings(broker_url="amqp://guest@localhost//", visibility_timeout_s=10)
    amqp.check_visibility_timeout()
