"""Worker guards: poison tasks, slow and hung captions, bad settings, unloadable models.

Each test runs real ``celery worker`` processes with a private redis-server (never the shared
one on 6379), a queue of their own, the loopback S3 server and the tiny SDNQ model.
Faults come from ``tests.support.faulty_engine`` through prompt markers. Timeouts are short so
that Redis hands unacknowledged tasks out again within seconds:

- task deadline 6 s, visibility margin 2 s, unacked restore every 1 s, at most 2 deliveries;
- visibility timeout 14 s: just above deadline + the 5 s a task thread waits past its deadline
  (``DEADLINE_GRACE_S``) + margin, the least ``Settings.check_visibility_timeout`` accepts
  (``tests/unit/test_settings.py`` checks that rule in-process).

Where a test restarts workers it does what Kubernetes would: a small supervisor loop starts a
new worker whenever the current one exits, a bounded number of times.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.stack import AMQP_URL, WorkerStack
from tests.support.waits import READY_TIMEOUT_S, wait_for_value
from worker.devtools.loopback import LoopbackS3
from worker.devtools.processes import WorkerProcess
from worker.runtime.lifecycle import EXIT_DEVICE_FAILED, EXIT_HUNG
from worker.settings import DEADLINE_GRACE_S

PRODUCTION_ENGINE = "worker.engine.hf_generate:load_engine"
# worker.queue.app.EXIT_START_FAILED; importing it here would configure Celery in-process.
EXIT_START_FAILED = 3

DEADLINE_S = 6.0
MARGIN_S = 2.0
NEEDED_VISIBILITY_S = DEADLINE_S + DEADLINE_GRACE_S + MARGIN_S  # 13: refused, as is anything less
VISIBILITY_S = int(NEEDED_VISIBILITY_S) + 1
MAX_DELIVERIES = 2
TERMINAL = ("SUCCESS", "FAILURE")


@pytest.fixture()
def broker() -> str:
    """The broker the stack uses; a test parametrizes ``broker`` to run on RabbitMQ too."""
    return "redis"


@pytest.fixture()
def stack(
    tiny_model_dir: Path, s3_server: LoopbackS3, tmp_path: Path, broker: str
) -> Iterator[WorkerStack]:
    amqp = {"CAPTION_BROKER_URL": AMQP_URL} if broker == "amqp" else {}
    with WorkerStack(
        tiny_model_dir,
        s3_server,
        tmp_path,
        name="guards",
        faulty=True,
        task_defaults={"max_new_tokens": 8},
        CAPTION_TASK_DEADLINE_S=f"{DEADLINE_S:g}",
        CAPTION_VISIBILITY_MARGIN_S=f"{MARGIN_S:g}",
        CAPTION_VISIBILITY_TIMEOUT_S=str(VISIBILITY_S),
        CAPTION_UNACKED_RESTORE_INTERVAL_S="1",
        CAPTION_MAX_DELIVERIES=str(MAX_DELIVERIES),
        **amqp,
    ) as stack:
        stack.task_defaults["image"] = stack.upload("plain.png")
        yield stack


def send(stack: WorkerStack, **kwargs: Any) -> str:
    """Queue one caption task as a producer would; return its id."""
    return str(stack.send(**kwargs).id)


def error_of(meta: dict[str, Any]) -> tuple[str, str]:
    """(exception type name, message) of a FAILURE, as a producer sees them."""
    exc = meta["result"]
    return type(exc).__name__, str(exc)


def wait_terminal(
    stack: WorkerStack, task_id: str, timeout_s: float, tick: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Poll until the task is SUCCESS or FAILURE; fail the test if it never gets there."""
    return wait_for_value(
        lambda: stack.meta(task_id),
        lambda meta: meta["status"] in TERMINAL,
        timeout_s,
        f"task {task_id} SUCCESS or FAILURE",
        tick=tick,
        interval_s=0.1,
    )


def interesting(log: str) -> str:
    """The lines of a worker log that tell what happened to tasks and to the process."""
    keys = ("received", "succeeded", "raised", "Exception in thread", "cannot start", "exiting")
    return "\n".join(line[:240] for line in log.splitlines() if any(k in line for k in keys))


@dataclass
class Supervisor:
    """Keeps one worker running, restarting it when it exits (bounded), like a Deployment."""

    stack: WorkerStack
    max_restarts: int
    extra: dict[str, str] = field(default_factory=dict)
    workers: list[WorkerProcess] = field(default_factory=list)
    exits: list[tuple[int, float]] = field(default_factory=list)  # (exit code, monotonic time)

    @property
    def current(self) -> WorkerProcess:
        return self.workers[-1]

    @property
    def pid(self) -> int:
        assert self.current.proc is not None
        return self.current.proc.pid

    def start(self) -> WorkerProcess:
        worker = self.stack.worker(**self.extra).start()
        self.workers.append(worker)
        return worker.wait_ready(READY_TIMEOUT_S)

    def tick(self) -> None:
        """Restart the worker if it has exited."""
        proc = self.current.proc
        assert proc is not None
        code = proc.poll()
        if code is None:
            return
        self.exits.append((code, time.monotonic()))
        if len(self.exits) > self.max_restarts:
            raise AssertionError(
                f"worker exited {len(self.exits)} times (codes {self.codes()}), more than the "
                f"{self.max_restarts} restarts allowed:\n{self.history()}"
            )
        self.start()

    def codes(self) -> list[int]:
        return [code for code, _ in self.exits]

    def history(self) -> str:
        return "\n".join(f"--- {w.log_path.name}\n{interesting(w.log())}" for w in self.workers)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop(timeout_s=15)

    def wait_terminal(self, task_id: str, timeout_s: float) -> dict[str, Any]:
        return wait_terminal(self.stack, task_id, timeout_s, tick=self.tick)


# --- Start-up guards ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "variable, value, complaint",
    [
        ("CAPTION_MAX_BATCH", "abc", "valid integer"),
        ("CAPTION_DTYPE", "int3", "'bfloat16', 'float16' or 'float32'"),
    ],
)
def test_invalid_setting_stops_the_worker_at_start_naming_the_variable(
    stack: WorkerStack, variable: str, value: str, complaint: str
) -> None:
    task_id = send(stack)
    worker = stack.worker(**{variable: value}).start()
    started = time.monotonic()
    code = worker.wait(60)
    elapsed = time.monotonic() - started
    log = worker.log()

    assert code != 0, log[-2000:]
    assert elapsed < 30
    # The reason is at the end of the output, where `kubectl logs` and `docker logs` show it.
    tail = log.strip().splitlines()[-5:]
    assert any(variable in line and complaint in line for line in tail), log[-2000:]
    assert "caption worker ready" not in log
    assert stack.waiting() == 1
    assert stack.meta(task_id)["status"] == "PENDING"


@pytest.mark.timeout(120)
def test_visibility_timeout_too_short_stops_the_worker_before_it_consumes(
    stack: WorkerStack,
) -> None:
    task_id = send(stack)
    # Exactly deadline + grace + margin: a task that overruns could be handed out twice.
    visibility = int(NEEDED_VISIBILITY_S)
    worker = stack.worker(CAPTION_VISIBILITY_TIMEOUT_S=str(visibility)).start()
    started = time.monotonic()
    code = worker.wait(60)
    elapsed = time.monotonic() - started
    log = worker.log()

    assert code == EXIT_START_FAILED, log[-2000:]
    assert elapsed < 30
    assert f"cannot start: ConfigError: CAPTION_VISIBILITY_TIMEOUT_S={visibility} must" in log
    assert "model loaded" not in log  # refused before spending minutes loading a model
    assert stack.waiting() == 1
    assert stack.unacked() == []
    assert stack.meta(task_id)["status"] == "PENDING"


@pytest.mark.timeout(240)
def test_corrupt_weights_stop_the_worker_and_leave_the_task_for_a_healthy_one(
    stack: WorkerStack, tiny_model_dir: Path, tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt-model"
    shutil.copytree(tiny_model_dir, corrupt)
    weights = corrupt / "model.safetensors"
    with weights.open("r+b") as handle:  # a garbled header, as from a bad disk or copy
        handle.write(b"\xff" * 64)
    task_id = send(stack)

    broken = stack.worker(CAPTION_MODEL=str(corrupt), CAPTION_ENGINE_FACTORY=PRODUCTION_ENGINE)
    code = broken.start().wait(READY_TIMEOUT_S)
    log = broken.log()

    assert code == EXIT_START_FAILED, log[-2000:]
    assert f"caption worker cannot start: ModelLoadError: cannot load model {corrupt}" in log
    assert "caption worker ready" not in log
    assert stack.waiting() == 1
    assert stack.unacked() == []
    assert stack.meta(task_id)["status"] == "PENDING"

    with stack.worker(CAPTION_ENGINE_FACTORY=PRODUCTION_ENGINE) as healthy:
        meta = wait_terminal(stack, task_id, 90)
        assert healthy.proc is not None
        healthy_pid = healthy.proc.pid
    assert meta["status"] == "SUCCESS", meta
    assert meta["result"]["text"]
    assert meta["result"]["worker"].endswith(f"/{healthy_pid}")


@pytest.mark.timeout(180)
def test_uncached_model_with_auto_download_off_stops_the_worker(
    stack: WorkerStack, tmp_path: Path
) -> None:
    hf_home = tmp_path / "empty-hf-home"
    hf_home.mkdir()
    repo = "some-owner/some-repo-not-cached"
    worker = stack.worker(
        CAPTION_MODEL=repo,
        CAPTION_AUTO_DOWNLOAD="false",
        CAPTION_ENGINE_FACTORY=PRODUCTION_ENGINE,
        HF_HOME=str(hf_home),
        HF_HUB_OFFLINE="1",
    )
    code = worker.start().wait(READY_TIMEOUT_S)
    log = worker.log()

    assert code == EXIT_START_FAILED, log[-2000:]
    lines = [line for line in log.splitlines() if line.startswith("caption worker cannot start")]
    assert lines, log[-2000:]
    assert f"ModelLoadError: cannot load model {repo}:" in lines[-1]
    assert "CAPTION_AUTO_DOWNLOAD is off" in lines[-1]
    assert str(hf_home) in lines[-1]
    assert not [p for p in hf_home.rglob("*") if p.is_file()]  # nothing was downloaded


# --- Faults while serving ----------------------------------------------------------------------


KILLED = ("[kill]", -9)  # a crash in native code
# A sticky CUDA error: the worker exits itself rather than fail every later task.
DEVICE_FAILED = ("[device-error]", EXIT_DEVICE_FAILED)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "engine, broker, fault",
    [
        ("generate", "redis", KILLED),
        ("slots", "redis", KILLED),
        ("generate", "amqp", KILLED),
        ("generate", "redis", DEVICE_FAILED),
        ("slots", "redis", DEVICE_FAILED),
    ],
    ids=["generate-redis", "slots-redis", "generate-amqp", "generate-device", "slots-device"],
)
def test_poison_task_fails_with_too_many_deliveries_and_spares_the_others(
    stack: WorkerStack, engine: str, broker: str, fault: tuple[str, int]
) -> None:
    """A task that ends its worker every time it runs: SIGKILLed, or exiting on a device
    error that would fail every later call.

    Each crash leaves the message unacknowledged; Redis hands it out again after the
    visibility timeout, RabbitMQ as soon as the dead worker's connection drops, to the
    restarted worker. Delivery MAX_DELIVERIES + 1 fails it, on either broker: the count
    lives in the result backend. Two ordinary tasks are sent together with it, and one
    more after it failed.
    """
    marker, exit_code = fault
    supervisor = Supervisor(
        stack, max_restarts=MAX_DELIVERIES + 1, extra={"CAPTION_ENGINE": engine}
    )
    try:
        supervisor.start()
        started = time.monotonic()
        poison = send(stack, prompt=f"{marker} Describe this image.")
        neighbours = [send(stack), send(stack)]
        poison_meta = supervisor.wait_terminal(poison, timeout_s=(MAX_DELIVERIES + 2) * 40)
        poison_s = time.monotonic() - started
        after = send(stack)
        after_meta = supervisor.wait_terminal(after, timeout_s=60)
        neighbour_metas = [supervisor.wait_terminal(t, timeout_s=60) for t in neighbours]
        supervisor.tick()
        alive = supervisor.current.proc is not None and supervisor.current.proc.poll() is None
        history = supervisor.history()
    finally:
        supervisor.stop()
    print(f"poison task terminal after {poison_s:.1f}s, worker exits {supervisor.codes()}")

    assert poison_meta["status"] == "FAILURE", history
    # Failed for good: its delivery and crash counters are gone with it.
    assert stack.bookkeeping(poison) == []
    kind, message = error_of(poison_meta)
    assert kind == "TooManyDeliveries", f"{kind}: {message}\n{history}"
    assert f"CAPTION_MAX_DELIVERIES={MAX_DELIVERIES}" in message
    assert "crashes the model" in message
    # One death per delivery that ran it, and no more once it was failed.
    assert supervisor.codes() == [exit_code] * MAX_DELIVERIES, history
    assert alive
    assert after_meta["status"] == "SUCCESS", f"{after_meta}\n{history}"
    assert after_meta["result"]["worker"].endswith(f"/{supervisor.pid}")
    outcomes = [
        (m["status"], error_of(m) if m["status"] == "FAILURE" else None) for m in neighbour_metas
    ]
    assert outcomes == [("SUCCESS", None)] * 2, f"tasks sent with the poison: {outcomes}\n{history}"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("engine", ["generate", "slots"])
def test_slow_caption_fails_with_caption_timeout_and_the_worker_goes_on(
    stack: WorkerStack, engine: str
) -> None:
    with stack.worker(FAULT_STEP_DELAY_S="0.5", CAPTION_ENGINE=engine) as worker:
        assert worker.proc is not None
        started = time.monotonic()
        # 400 steps of 0.5 s each cannot finish within the 6 s deadline.
        slow = send(stack, prompt="[slow] Describe this image.", max_new_tokens=400)
        slow_meta = wait_terminal(stack, slow, timeout_s=DEADLINE_S + 30)
        elapsed = time.monotonic() - started
        normal_meta = wait_terminal(stack, send(stack), timeout_s=60)
        alive = worker.proc.poll() is None
        final = stack.meta(slow)
        history = interesting(worker.log())
    print(f"slow task failed {elapsed:.2f}s after it was sent (deadline {DEADLINE_S:g}s)")

    assert slow_meta["status"] == "FAILURE", history
    kind, message = error_of(slow_meta)
    assert kind == "CaptionTimeout", f"{kind}: {message}"
    assert "deadline" in message
    assert DEADLINE_S <= elapsed <= DEADLINE_S + 3, elapsed
    assert alive
    assert normal_meta["status"] == "SUCCESS", f"{normal_meta}\n{history}"
    assert normal_meta["result"]["worker"].endswith(f"/{worker.proc.pid}")
    assert (final["status"], error_of(final)[0]) == ("FAILURE", "CaptionTimeout")  # not rerun


@pytest.mark.timeout(240)
@pytest.mark.parametrize("engine", ["generate", "slots"])
def test_hung_generate_times_out_and_the_watchdog_replaces_the_process(
    stack: WorkerStack, engine: str
) -> None:
    """A generate call that ignores deadlines (a stuck kernel).

    The task thread stops waiting DEADLINE_GRACE_S (5 s) after the deadline and fails the task
    with CaptionTimeout, which acknowledges it. The hang grace is set above that, so the
    watchdog ends the process afterwards (exit code EXIT_HUNG) and a fresh worker takes over.

    With a hang grace below DEADLINE_GRACE_S the watchdog wins instead: the process exits
    before the task is failed, the unacknowledged task goes to the next worker and hangs it
    too, and the producer sees STARTED until TooManyDeliveries after CAPTION_MAX_DELIVERIES
    hung workers (about 33 s with these settings and a 3 s grace).
    """
    hang_grace = DEADLINE_GRACE_S + 2
    supervisor = Supervisor(
        stack,
        max_restarts=2,
        extra={"CAPTION_HANG_GRACE_S": f"{hang_grace:g}", "CAPTION_ENGINE": engine},
    )
    try:
        supervisor.start()
        first_pid = supervisor.pid
        started = time.monotonic()
        hung = send(stack, prompt="[hang] Describe this image.")
        hung_meta = supervisor.wait_terminal(hung, timeout_s=DEADLINE_S + hang_grace + 30)
        failed_s = time.monotonic() - started
        exit_by = time.monotonic() + hang_grace + 30
        while not supervisor.exits and time.monotonic() < exit_by:
            supervisor.tick()
            time.sleep(0.05)
        normal_meta = supervisor.wait_terminal(send(stack), timeout_s=60)
        final = stack.meta(hung)
        waiting, unacked = stack.waiting(), stack.unacked()
        history = supervisor.history()
    finally:
        supervisor.stop()
    assert supervisor.exits, f"the hung worker never exited\n{history}"
    code, exited_at = supervisor.exits[0]
    exit_s = exited_at - started
    print(f"hung task failed after {failed_s:.2f}s; worker exited {code} after {exit_s:.2f}s")

    assert hung_meta["status"] == "FAILURE", history
    kind, message = error_of(hung_meta)
    assert kind == "CaptionTimeout", f"{kind}: {message}\n{history}"
    assert DEADLINE_S <= failed_s <= DEADLINE_S + DEADLINE_GRACE_S + 3, failed_s
    assert code == EXIT_HUNG, history
    assert DEADLINE_S + hang_grace <= exit_s <= DEADLINE_S + hang_grace + 4, exit_s
    assert supervisor.codes() == [EXIT_HUNG], history
    assert normal_meta["status"] == "SUCCESS", f"{normal_meta}\n{history}"
    assert normal_meta["result"]["worker"].endswith(f"/{supervisor.pid}")
    assert supervisor.pid != first_pid
    # The hung task stays failed: it was acknowledged, so the fresh worker did not rerun it.
    assert (final["status"], error_of(final)[0]) == ("FAILURE", "CaptionTimeout"), history
    assert (waiting, unacked) == (0, [])
