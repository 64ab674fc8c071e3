"""The operations endpoints over real HTTP: /metrics, /healthz and /readyz.

The server runs for real on a loopback port; the probes answer from a real ``Lifecycle``
driven through its states with the fake engine (``CAPTION_ENGINE_FACTORY``), so what an
orchestrator would see at each step is what is asserted.
"""

from __future__ import annotations

import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker.errors import ConfigError
from worker.ops.http import OpsServer, serve_operations
from worker.ops.metrics import Metrics
from worker.runtime.lifecycle import Lifecycle
from worker.settings import DEADLINE_GRACE_S, Settings

FAKE = "tests.support.fake_engine:load_fake_engine"
FAILING = "tests.support.fake_engine:load_failing_engine"
DEADLINE_S = 2.0


def settings(**values: object) -> Settings:
    # A hang grace far beyond any test: the watchdog must never end the test process.
    base: dict[str, object] = {
        "engine_factory": FAKE,
        "engine": "generate",  # the fake is a whole-batch engine
        "task_deadline_s": DEADLINE_S,
        "hang_grace_s": 600.0,
        "metrics_port": 0,
    }
    return Settings(**{**base, **values})  # type: ignore[arg-type]


def get(server: OpsServer, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, whatever the status."""
    url = f"http://127.0.0.1:{server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


@contextmanager
def serving(lifecycle: Lifecycle) -> Iterator[OpsServer]:
    server = OpsServer(
        0, lifecycle.metrics.registry, lifecycle.not_ready, lifecycle.unhealthy, "127.0.0.1"
    ).start()
    try:
        yield server
    finally:
        server.close()


def sample(body: str, name: str) -> float | None:
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == name:
                return float(s.value)
    return None


# --- Routes ------------------------------------------------------------------------------------


def test_routes_answer_from_the_checks_and_the_registry() -> None:
    metrics = Metrics()
    metrics.task_finished("captions", "success", 0.2)
    state: dict[str, str | None] = {"ready": "starting", "healthy": None}
    server = OpsServer(
        0, metrics.registry, lambda: state["ready"], lambda: state["healthy"], "127.0.0.1"
    ).start()
    try:
        assert get(server, "/readyz") == (503, "text/plain; charset=utf-8", "starting\n")
        assert get(server, "/healthz")[::2] == (200, "ok\n")
        state.update(ready=None, healthy="the model thread has died")
        assert get(server, "/readyz")[::2] == (200, "ready\n")
        assert get(server, "/healthz")[::2] == (503, "the model thread has died\n")

        status, content_type, body = get(server, "/metrics")
        assert status == 200
        assert content_type.startswith("text/plain; version=0.0.4")
        assert sample(body, "caption_tasks_total") == 1
        assert get(server, "/")[0] == 404
    finally:
        server.close()


def test_a_check_that_raises_answers_503_not_500() -> None:
    def broken() -> str | None:
        raise RuntimeError("boom")

    server = OpsServer(0, Metrics().registry, broken, broken, "127.0.0.1").start()
    try:
        status, _, body = get(server, "/healthz")
    finally:
        server.close()
    assert status == 503
    assert "the check failed" in body and "boom" in body


# --- Readiness through the lifecycle -----------------------------------------------------------


def test_readyz_is_200_only_after_warm_up_and_while_consuming(tmp_path: Path) -> None:
    lifecycle = Lifecycle()
    ready_file = tmp_path / "ready"
    with serving(lifecycle) as server:
        seen = [get(server, "/readyz")[::2]]
        lifecycle.start(settings(ready_file=str(ready_file)), "unit/1")
        seen.append(get(server, "/readyz")[::2])  # model answered, consumer not yet connected
        lifecycle.mark_consuming()
        seen.append(get(server, "/readyz")[::2])
        ready_gauge = sample(get(server, "/metrics")[2], "caption_worker_ready")
        lifecycle.begin_shutdown()  # Celery's worker_shutting_down: in-flight tasks go on
        seen.append(get(server, "/readyz")[::2])
        file_while_draining = ready_file.exists()
        healthy_while_draining = get(server, "/healthz")[0]
        lifecycle.stop()
        seen.append(get(server, "/readyz")[::2])
        healthy_after_stop = get(server, "/healthz")[0]

    assert seen == [
        (503, "new\n"),
        (503, "model loaded, consumer not connected yet\n"),
        (200, "ready\n"),
        (503, "shutting down\n"),
        (503, "shutting down\n"),
    ]
    assert ready_gauge == 1
    assert not file_while_draining  # the ready file and /readyz agree
    # Draining and stopping are healthy: a liveness probe must not kill a worker finishing.
    assert (healthy_while_draining, healthy_after_stop) == (200, 200)


def test_a_worker_that_finished_starting_after_shutdown_began_never_turns_ready() -> None:
    lifecycle = Lifecycle()
    lifecycle.start(settings(), "unit/1")
    try:
        lifecycle.begin_shutdown()
        lifecycle.mark_consuming()
        assert lifecycle.not_ready() == "shutting down"
    finally:
        lifecycle.stop()


# --- Health through the lifecycle --------------------------------------------------------------


def test_healthz_is_503_while_a_model_call_outlives_the_deadline() -> None:
    lifecycle = Lifecycle()
    lifecycle.start(settings(), "unit/1")
    lifecycle.mark_consuming()
    runner = lifecycle.service.runner
    try:
        with serving(lifecycle) as server:
            # A call started just within the deadline and its one-step grace: still healthy.
            runner.busy_since = time.monotonic() - (DEADLINE_S + DEADLINE_GRACE_S - 1)
            within = get(server, "/healthz")[0]
            runner.busy_since = time.monotonic() - (DEADLINE_S + DEADLINE_GRACE_S + 1)
            hung = get(server, "/healthz")
            hung_ready = get(server, "/readyz")[0]
            runner.busy_since = None
            recovered = get(server, "/healthz")[0]
    finally:
        runner.busy_since = None
        lifecycle.stop()

    assert within == 200
    assert hung[0] == 503
    assert "model call has run for over 7s" in hung[2]
    assert hung_ready == 503  # an unhealthy worker is not ready either
    assert recovered == 200


def test_healthz_is_503_when_the_model_thread_is_dead() -> None:
    lifecycle = Lifecycle()
    lifecycle.start(settings(), "unit/1")
    lifecycle.mark_consuming()
    try:
        lifecycle.service.runner.stop(timeout=5)  # as if it had died
        with serving(lifecycle) as server:
            health = get(server, "/healthz")
            ready = get(server, "/readyz")[0]
    finally:
        lifecycle.stop()
    assert health[::2] == (503, "the model thread has died\n")
    assert ready == 503


def test_healthz_is_200_while_loading_and_503_after_a_failed_start() -> None:
    lifecycle = Lifecycle()
    with serving(lifecycle) as server:
        loading = get(server, "/healthz")[0]
        with pytest.raises(Exception, match="cannot load"):
            lifecycle.start(settings(engine_factory=FAILING), "unit/1")
        failed = get(server, "/healthz")
    assert loading == 200
    assert failed[0] == 503 and "defunct" in failed[2]


# --- The port setting --------------------------------------------------------------------------


def test_port_zero_turns_the_endpoints_off() -> None:
    assert serve_operations(settings(metrics_port=0), Lifecycle()) is None


@contextmanager
def taken_port(port: int = 0) -> Iterator[int]:
    """A port some other process would hold: bound and listening, or already taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(("0.0.0.0", port))
            sock.listen()
        except OSError:
            pass  # someone else holds it: just as taken
        yield port or sock.getsockname()[1]
    finally:
        sock.close()


def test_an_explicit_port_that_is_taken_stops_the_worker_naming_the_variable() -> None:
    with taken_port() as port, pytest.raises(ConfigError) as refused:
        serve_operations(settings(metrics_port=port), Lifecycle())
    assert f"CAPTION_METRICS_PORT={port}" in str(refused.value)


def test_the_default_port_taken_leaves_the_endpoints_off_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    default = Settings.model_fields["metrics_port"].default
    # The port is not set: the default applies.
    plain = Settings(engine_factory=FAKE, engine="generate")
    assert "metrics_port" not in plain.model_fields_set
    with taken_port(default), caplog.at_level(logging.WARNING):
        assert serve_operations(plain, Lifecycle()) is None
    assert f"default port {default} is taken" in caplog.text


def test_an_explicit_free_port_serves_the_lifecycle() -> None:
    with taken_port() as port:
        pass  # free again
    lifecycle = Lifecycle()
    server = serve_operations(settings(metrics_port=port), lifecycle)
    assert server is not None
    try:
        assert get(server, "/readyz")[::2] == (503, "new\n")
    finally:
        server.close()
