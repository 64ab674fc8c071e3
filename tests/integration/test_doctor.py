"""``caption-worker doctor``'s checks against real parts: the machine's Redis, a real
RabbitMQ, moto's S3 server, a denying S3 look-alike, and the tiny SDNQ model in a
Hugging Face cache laid out as the hub client writes it."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_s3 import FakeS3Server, S3Handler
from tests.support.images import png_bytes
from worker.devtools.loopback import free_port
from worker.engine.catalogue import resolve_model
from worker.engine.footprint import estimate_footprint
from worker.ops.doctor import (
    GIB,
    CeleryValues,
    DoctorOptions,
    Gpu,
    GpuProbe,
    Status,
    check_broker,
    check_bucket,
    check_model,
    check_object,
    check_result_backend,
    check_visibility_timeout,
    find_model_files,
    run_checks,
)
from worker.ops.doctor import s3_client as doctor_s3_client
from worker.settings import Settings

RABBITMQ = ("127.0.0.1", 5672)
REPO = "acme/tiny-captioner"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def amqp_url() -> str:
    """The machine's RabbitMQ; missing it skips locally but fails in CI."""
    try:
        socket.create_connection(RABBITMQ, timeout=2).close()
    except OSError:
        if os.environ.get("CI"):
            pytest.fail(f"RabbitMQ is required in CI at {RABBITMQ}")
        pytest.skip(f"no RabbitMQ at {RABBITMQ}")
    return "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture()
def hub_cache(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A Hugging Face hub cache holding the tiny model as ``acme/tiny-captioner`` at main."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


def settings_for(redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "broker_url": f"{redis_url}/0",
        "result_backend": f"{redis_url}/0",
        "auto_download": False,
        "device": "cpu",
        "dtype": "float32",
        "s3_addressing_style": "path",
    }
    return Settings(**{**values, **overrides})


def celery_for(settings: Settings) -> CeleryValues:
    """What celeryconfig.py sets for these settings."""
    return CeleryValues(
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        result_expires=settings.result_expires_s,
    )


# --- the whole report --------------------------------------------------------------------------


def test_a_good_configuration_passes_every_check(
    redis_url: str, s3_env: dict[str, str], bucket: str, s3_client: Any, tiny_model_dir: Path
) -> None:
    s3_client.put_object(Bucket=bucket, Key="cats/tabby.png", Body=png_bytes())
    settings = settings_for(redis_url, allowed_buckets=(bucket,), model=str(tiny_model_dir))
    options = DoctorOptions(f"s3://{bucket}/cats/tabby.png", TIMEOUT_S)

    results = run_checks(settings, celery_for(settings), options)

    assert [r.check for r in results] == [
        "broker",
        "result backend",
        f"s3 bucket {bucket}",
        "s3 object",
        "visibility timeout",
        "prefetch",
        "task events",
        "result expiry",
        "model",
        "gpu",
        "weights fit",
    ]
    not_ok = {r.check: r.status for r in results if r.status is not Status.OK}
    assert not_ok == {"weights fit": Status.SKIP}  # CAPTION_DEVICE=cpu: nothing to fit
    by_name = {r.check: r.message for r in results}
    assert by_name["s3 object"].startswith(f"s3://{bucket}/cats/tabby.png is readable")
    assert "CAPTION_DEVICE=cpu" in by_name["gpu"]


def test_the_model_in_the_hub_cache_is_found_offline_and_sized_for_a_gpu(
    redis_url: str, hub_cache: Path
) -> None:
    settings = settings_for(redis_url, model=REPO, device=None, weights="bf16")
    small = GpuProbe((Gpu(0, "Test GPU", 2 * GIB, 1 * GIB),), "12.8")
    large = GpuProbe((Gpu(0, "Test GPU", 80 * GIB, 79 * GIB),), "12.8")

    tight = run_checks(
        settings,
        celery_for(settings),
        DoctorOptions(),
        cache_dir=hub_cache,
        gpu_probe=lambda: small,
    )
    roomy = run_checks(
        settings,
        celery_for(settings),
        DoctorOptions(),
        cache_dir=hub_cache,
        gpu_probe=lambda: large,
    )

    model = {r.check: r for r in tight}["model"]
    assert model.status is Status.OK
    assert f"{REPO} is in the Hugging Face cache" in model.message
    assert COMMIT in model.message
    fit = {r.check: r for r in tight}["weights fit"]
    assert fit.status is Status.FAIL  # the 2 GiB activation margin alone exceeds 1 GiB free
    assert "CAPTION_WEIGHTS=bf16" in fit.message and "refuse to start" in fit.message
    assert {r.check: r.status for r in roomy}["weights fit"] is Status.OK


def test_a_model_cache_missing_its_weights_fails_without_downloads(hub_cache: Path) -> None:
    snapshot = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    (snapshot / "model.safetensors").unlink()
    files = find_model_files(resolve_model(REPO), None, hub_cache)
    result = check_model(files, auto_download=False, cache_dir=str(hub_cache))
    assert result.status is Status.FAIL
    assert "lacks model.safetensors" in result.message
    assert "CAPTION_AUTO_DOWNLOAD=false" in result.message


def test_an_empty_cache_does_not_hold_the_model(tmp_path: Path) -> None:
    files = find_model_files(resolve_model(REPO), None, tmp_path)
    assert files.directory is None
    assert check_model(files, False, str(tmp_path)).status is Status.FAIL


def test_the_estimate_from_files_matches_the_worker_on_the_loaded_model(
    tiny_model_dir: Path,
) -> None:
    from worker.engine.loading import load_model, reserve_bytes
    from worker.engine.weights import extra_bytes

    loaded_settings = Settings(model=str(tiny_model_dir), dtype="float32", device="cpu")
    model, _, _ = load_model(loaded_settings)
    loaded = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    weight_files = [tiny_model_dir / "model.safetensors"]
    for form in ("bf16", "int8"):
        settings = loaded_settings.model_copy(update={"weights": form})
        estimate = estimate_footprint(tiny_model_dir, weight_files, settings)
        # The same numbers the worker's start-up check computes on the loaded model.
        assert estimate.extra_bytes == extra_bytes(model, form, 4)
        assert estimate.reserve_bytes == reserve_bytes(model, settings)
        # Files hold every persistent tensor; the rest are small non-persistent buffers.
        assert abs(estimate.weights_bytes - loaded) <= 0.01 * loaded


# --- brokers and the result backend ------------------------------------------------------------


def test_a_real_rabbitmq_broker_passes(amqp_url: str) -> None:
    result = check_broker(amqp_url, None, TIMEOUT_S)
    assert result.status is Status.OK
    assert result.message.startswith("amqp://guest:**@127.0.0.1:5672// answered in")
    skipped = check_visibility_timeout(Settings(broker_url=amqp_url, visibility_timeout_s=10))
    assert skipped.status is Status.SKIP


def test_a_wrong_rabbitmq_password_fails_without_echoing_it(amqp_url: str) -> None:
    result = check_broker("amqp://guest:not-the-password@127.0.0.1:5672//", None, TIMEOUT_S)
    assert result.status is Status.FAIL
    assert "ACCESS_REFUSED" in result.message and "CAPTION_BROKER_URL" in result.message
    assert "not-the-password" not in result.message


def test_the_machines_redis_passes_as_broker_and_backend(redis_url: str) -> None:
    assert check_broker(f"{redis_url}/0", None, TIMEOUT_S).status is Status.OK
    assert check_result_backend(f"{redis_url}/0", None, TIMEOUT_S).status is Status.OK


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_a_closed_port_fails_at_once_in_one_line(scheme: str) -> None:
    url = f"{scheme}://user:pw@127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    result = check_broker(url, None, TIMEOUT_S)
    assert time.monotonic() - started < TIMEOUT_S
    assert result.status is Status.FAIL
    assert "Connection refused" in result.message and "CAPTION_BROKER_URL" in result.message
    assert "\n" not in result.message and ":pw@" not in result.message


def test_an_unreachable_result_backend_fails_naming_the_variable() -> None:
    result = check_result_backend(f"redis://127.0.0.1:{free_port()}/0", None, TIMEOUT_S)
    assert result.status is Status.FAIL
    assert "Connection refused" in result.message and "CAPTION_RESULT_BACKEND" in result.message


@pytest.fixture()
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections and never answers: a hung service."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # the kernel completes handshakes; nobody ever reads
        yield int(listener.getsockname()[1])


def test_hung_services_cost_one_timeout_not_one_each(
    silent_port: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    silent = f"127.0.0.1:{silent_port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://{silent}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "doctor-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "doctor-secret")
    settings = settings_for(
        f"redis://{silent}", allowed_buckets=("photos", "thumbs", "avatars"), model=str(tmp_path)
    )
    started = time.monotonic()
    results = run_checks(settings, celery_for(settings), DoctorOptions("s3://photos/a.png", 1.0))
    assert time.monotonic() - started < 6  # 1 s timeouts, checked at once
    failed = [r.check for r in results if r.status is Status.FAIL]
    assert failed[:6] == [
        "broker",
        "result backend",
        "s3 bucket photos",
        "s3 bucket thumbs",
        "s3 bucket avatars",
        "s3 object",
    ]
    assert all("\n" not in r.message for r in results)


# --- S3 ----------------------------------------------------------------------------------------


def test_an_existing_object_passes_and_a_missing_one_fails(
    s3_env: dict[str, str], bucket: str, s3_client: Any
) -> None:
    s3_client.put_object(Bucket=bucket, Key="cat.png", Body=png_bytes())
    client = s3_client_for(Settings(s3_addressing_style="path"))
    found = check_object(client, f"s3://{bucket}/cat.png", (bucket,), max_image_bytes=10**6)
    missing = check_object(client, f"s3://{bucket}/dog.png", (bucket,), max_image_bytes=10**6)
    assert found.status is Status.OK
    assert missing.status is Status.FAIL
    assert missing.message.startswith(f"s3://{bucket}/dog.png does not exist at http://127.0.0.1")


def test_an_object_over_the_byte_cap_fails_as_the_worker_would(
    s3_env: dict[str, str], bucket: str, s3_client: Any
) -> None:
    s3_client.put_object(Bucket=bucket, Key="big.png", Body=b"x" * 2048)
    client = s3_client_for(Settings(s3_addressing_style="path"))
    result = check_object(client, f"s3://{bucket}/big.png", (), max_image_bytes=1024)
    assert result.status is Status.FAIL
    assert "2048 bytes, over CAPTION_MAX_IMAGE_BYTES=1024" in result.message
    assert "ImageTooLarge" in result.message


def test_a_missing_bucket_fails(s3_env: dict[str, str]) -> None:
    client = s3_client_for(Settings(s3_addressing_style="path"))
    result = check_bucket(client, "no-such-bucket-here")
    assert result.status is Status.FAIL
    assert "s3://no-such-bucket-here does not exist" in result.message
    assert "CAPTION_ALLOWED_BUCKETS" in result.message


class DenyingHandler(S3Handler):
    """An S3 look-alike that refuses every request, as a store does for wrong credentials."""

    def do_HEAD(self) -> None:
        self.reply(403, b"")


@pytest.fixture()
def denying_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    with FakeS3Server(DenyingHandler) as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint_url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "doctor-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "doctor-secret")
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
        yield


@pytest.mark.usefixtures("denying_store")
def test_a_denied_bucket_warns_and_a_denied_object_fails() -> None:
    client = s3_client_for(Settings(s3_addressing_style="path"))
    bucket = check_bucket(client, "photos")
    # HeadBucket needs s3:ListBucket, which workers do not use: not proof they cannot read.
    assert bucket.status is Status.WARN
    assert "--object s3://photos/<key>" in bucket.message
    obj = check_object(client, "s3://photos/cat.png", (), max_image_bytes=10)
    assert obj.status is Status.FAIL
    assert "denied access" in obj.message and "doctor-secret" not in obj.message


def test_an_unreachable_store_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "doctor-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "doctor-secret")
    started = time.monotonic()
    result = check_bucket(s3_client_for(Settings(s3_addressing_style="path")), "photos")
    assert time.monotonic() - started < TIMEOUT_S
    assert result.status is Status.FAIL
    assert "cannot reach the store" in result.message and "AWS_ENDPOINT_URL_S3" in result.message


def s3_client_for(settings: Settings) -> Any:
    return doctor_s3_client(settings, TIMEOUT_S)
