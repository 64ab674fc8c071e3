from __future__ import annotations

from typing import Any

import pytest

from worker.errors import ConfigError
from worker.settings import DEADLINE_GRACE_S, Settings, load_settings

DEADLINE_S = 6.0
MARGIN_S = 2.0
NEEDED_VISIBILITY_S = DEADLINE_S + DEADLINE_GRACE_S + MARGIN_S  # 13: refused, as is anything less


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


@pytest.mark.parametrize(("span", "cycle"), [("10", "8"), ("1", "1")])
def test_a_repetition_span_shorter_than_two_cycles_is_refused(
    monkeypatch: pytest.MonkeyPatch, span: str, cycle: str
) -> None:
    monkeypatch.setenv("CAPTION_REPETITION_SPAN", span)
    monkeypatch.setenv("CAPTION_REPETITION_MAX_CYCLE", cycle)
    with pytest.raises(ConfigError, match="CAPTION_REPETITION_SPAN"):
        load_settings()


def test_a_repetition_span_of_zero_turns_the_guard_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTION_REPETITION_SPAN", "0")
    assert load_settings().repetition_span == 0


def test_task_threads_fill_every_slot_or_a_whole_batch() -> None:
    assert Settings(max_batch=8, slots=64).task_threads == 64 + 4
    assert Settings(engine="generate", max_batch=8, slots=64).task_threads == 8 + 4
    assert Settings(max_batch=8, slots=64, concurrency=20).task_threads == 20


def test_slot_defaults_follow_the_batch_and_pixel_limits() -> None:
    settings = Settings(max_batch=12, max_pixels=1_048_576, max_new_tokens_limit=4096)
    assert (settings.slot_count, settings.slot_capacity) == (12, 1024 + 512 + 1024)
    assert Settings(slots=3, slot_tokens=700).slot_count == 3
    assert Settings(slots=3, slot_tokens=700).slot_capacity == 700


def test_the_slot_engine_is_the_default_where_every_weight_is_on_the_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CAPTION_ENGINE", raising=False)
    assert load_settings().engine == "slots"
    # Weights that spill to or stream from CPU RAM are served by the whole-batch engine.
    for mode in ("balanced", "lowvram"):
        monkeypatch.setenv("CAPTION_MEMORY_MODE", mode)
        assert load_settings().engine == "generate"
    monkeypatch.setenv("CAPTION_ENGINE", "generate")
    assert load_settings().engine == "generate"


def test_slots_with_a_spilling_memory_mode_is_refused_with_the_alternatives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CAPTION_MEMORY_MODE", "lowvram")
    monkeypatch.setenv("CAPTION_ENGINE", "slots")
    with pytest.raises(ConfigError) as refused:
        load_settings()
    message = str(refused.value)
    assert "CAPTION_MEMORY_MODE=gpu" in message and "lowvram" in message
    assert "CAPTION_ENGINE=generate" in message


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


def _settings(**values: Any) -> Settings:
    return Settings(**{"task_deadline_s": DEADLINE_S, "visibility_margin_s": MARGIN_S, **values})


@pytest.mark.parametrize("below", [0, 1, 5])
@pytest.mark.parametrize("broker", ["redis://127.0.0.1:1/0", "rediss://cache:6380/0", "unix:///r"])
def test_visibility_timeout_not_above_deadline_grace_and_margin_is_refused(
    broker: str, below: int
) -> None:
    visibility = int(NEEDED_VISIBILITY_S) - below
    settings = _settings(broker_url=broker, visibility_timeout_s=visibility)
    with pytest.raises(ConfigError) as caught:
        settings.check_visibility_timeout()
    message = str(caught.value)
    assert message.startswith(f"CAPTION_VISIBILITY_TIMEOUT_S={visibility} must exceed")
    assert "CAPTION_TASK_DEADLINE_S" in message and "CAPTION_VISIBILITY_MARGIN_S" in message
    assert f"= {NEEDED_VISIBILITY_S:g}:" in message
    assert "second worker" in message  # says why


def test_visibility_timeout_above_deadline_grace_and_margin_is_accepted() -> None:
    _settings(
        broker_url="redis://127.0.0.1:1/0", visibility_timeout_s=int(NEEDED_VISIBILITY_S) + 1
    ).check_visibility_timeout()
    # The production defaults (600 s deadline, 60 s margin, one hour), whatever the environment.
    names = ("task_deadline_s", "visibility_margin_s", "visibility_timeout_s")
    defaults = {name: Settings.model_fields[name].default for name in names}
    Settings(broker_url="redis://127.0.0.1:1/0", **defaults).check_visibility_timeout()


def test_visibility_timeout_is_not_checked_for_brokers_without_one() -> None:
    _settings(broker_url="amqp://guest@rabbit//", visibility_timeout_s=5).check_visibility_timeout()


def test_rabbitmq_consumer_timeout_must_exceed_deadline_grace_and_margin() -> None:
    needed = int(NEEDED_VISIBILITY_S)
    short = _settings(broker_url="amqp://guest@rabbit//", amqp_consumer_timeout_s=needed)
    with pytest.raises(ConfigError) as caught:
        short.check_visibility_timeout()
    message = str(caught.value)
    assert message.startswith(f"CAPTION_AMQP_CONSUMER_TIMEOUT_S={needed} (RabbitMQ's")
    assert "consumer_timeout in rabbitmq.conf" in message  # says what to change
    _settings(
        broker_url="amqp://guest@rabbit//", amqp_consumer_timeout_s=needed + 1
    ).check_visibility_timeout()
    # RabbitMQ's default (30 minutes) fits the default deadline.
    Settings(broker_url="amqp://guest@rabbit//").check_visibility_timeout()


def test_heartbeat_must_beat_at_least_three_times_before_a_worker_is_dead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CAPTION_HEARTBEAT_INTERVAL_S", "10")
    monkeypatch.setenv("CAPTION_WORKER_DEAD_AFTER_S", "20")
    with pytest.raises(ConfigError, match="CAPTION_WORKER_DEAD_AFTER_S"):
        load_settings()
    monkeypatch.setenv("CAPTION_HEARTBEAT_INTERVAL_S", "2")
    monkeypatch.setenv("CAPTION_WORKER_DEAD_AFTER_S", "6")
    settings = load_settings()
    assert (settings.heartbeat_interval_s, settings.worker_dead_after_s) == (2, 6)
