"""The Grafana dashboard (docker/grafana/caption-worker.json) against a real Prometheus.

A real Prometheus (Debian's ``prometheus`` package, ``/usr/bin/prometheus``) runs on the
shipped ``docker/prometheus/prometheus.yml`` with its targets pointed at a real worker
process and a real ``caption-worker exporter`` process, scraping both every second. 20 tasks
(4 of them for missing objects) are queued before the worker starts, so the exporter reports
them waiting while the model loads. Once the worker has drained them and Prometheus has
scraped the end, every expression of every panel is evaluated through Prometheus' HTTP API:
each must parse and evaluate, and the key ones must show what the run did.

``Prometheus``, ``ExporterProcess`` and ``prometheus_config`` are reused by
``scripts/record_run.py``, which records the run behind docs/img/run-throughput-queue.png.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.stack import REPO_ROOT, WorkerStack
from tests.support.waits import READY_TIMEOUT_S, TASK_TIMEOUT_S, wait_for_value
from worker.devtools.loopback import LoopbackS3, free_port, terminate, wait_for_http
from worker.devtools.processes import WorkerProcess

PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
DASHBOARD = REPO_ROOT / "docker" / "grafana" / "caption-worker.json"
SHIPPED_CONFIG = REPO_ROOT / "docker" / "prometheus" / "prometheus.yml"
WORKER_JOB, EXPORTER_JOB = "caption-worker", "caption-exporter"
CLI = str(Path(sys.executable).with_name("caption-worker"))

GOOD, MISSING = 16, 4  # captions, and tasks for missing objects (ImageNotFound)
TOTAL = GOOD + MISSING
SCRAPE_S = 1
# What Grafana's $__rate_interval would be at a 1 s scrape, for the parse-and-evaluate pass.
RATE_INTERVAL = "30s"


def require_prometheus() -> None:
    """Fail (never skip) when Prometheus is not installed: CI installs it (.ci/run)."""
    missing = [str(p) for p in (PROMETHEUS, PROMTOOL) if not p.exists()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: this test runs a real Prometheus. Install "
            "Debian's `prometheus` package (apt-get install prometheus; .ci/run does)."
        )


# --- the processes ----------------------------------------------------------------------------


def prometheus_config(
    workers: list[str], exporter: str, queue: str, interval_s: int = SCRAPE_S
) -> dict[str, Any]:
    """The shipped prometheus.yml, with its two jobs' targets replaced and a faster scrape.

    Everything else (``honor_labels``, the workers' ``queue`` target label) is kept, so the
    dashboard is tested against the configuration compose runs.
    """
    config: dict[str, Any] = yaml.safe_load(SHIPPED_CONFIG.read_text())
    config["global"].update(
        scrape_interval=f"{interval_s}s",
        evaluation_interval=f"{interval_s}s",
        scrape_timeout=f"{interval_s}s",
    )
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {WORKER_JOB, EXPORTER_JOB}, sorted(jobs)
    [worker_targets] = jobs[WORKER_JOB]["static_configs"]
    worker_targets["targets"] = workers
    worker_targets["labels"]["queue"] = queue
    jobs[EXPORTER_JOB]["static_configs"] = [{"targets": [exporter]}]
    return config


class Prometheus:
    """A real Prometheus process on a free loopback port, with its own TSDB under ``workdir``."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "prometheus.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._command = [
            str(PROMETHEUS),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30) -> Prometheus:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self._command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_for_value(self._ready, bool, timeout_s, f"Prometheus ready ({self.log()[-2000:]})")
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited {self.proc.returncode}: {self.log()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """GET ``/api/v1/<path>``; the decoded body, whatever its status (errors included)."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as answer:
                body: dict[str, Any] = json.loads(answer.read())
        except urllib.error.HTTPError as err:  # 400 (bad_data) and 422 (execution) carry JSON
            body = json.loads(err.read())
        return body

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's vector (or a scalar as one unlabelled sample); fails on error."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        body = self.api("query", **params)
        assert body["status"] == "success", (expr, body)
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets_up(self) -> dict[str, float]:
        """``up`` of every target, by job."""
        return {s["metric"]["job"]: float(s["value"][1]) for s in self.query("up")}

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout_s=15)
            self.proc = None


class ExporterProcess:
    """``caption-worker exporter --queue <queue> --port <free port>`` in the stack's env."""

    def __init__(self, env: dict[str, str], queue: str, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [CLI, "exporter", "--queue", queue, "--port", str(self.port)],
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float = 60) -> ExporterProcess:
        wait_for_http(self.url, timeout_s, self.proc)
        return self

    def stop(self) -> int:
        return terminate(self.proc, timeout_s=15)


# --- the dashboard ----------------------------------------------------------------------------


def dashboard_panels() -> dict[str, list[str]]:
    """Panel title (with its type, as titles repeat across types) -> its expressions."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels: dict[str, list[str]] = {}
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        key = f"{panel['type']}:{panel['title']}"
        assert key not in panels, key
        panels[key] = [target["expr"] for target in panel["targets"]]
    return panels


def substitute(expr: str, queue: str, rate_interval: str) -> str:
    """What Grafana sends for one queue selected and a rate window.

    (Grafana escapes regex metacharacters in a selected value; test queue names have none.)
    """
    assert re.fullmatch(r"[A-Za-z0-9_-]+", queue), queue
    out = expr.replace("$__rate_interval", rate_interval).replace("${queue}", queue)
    out = out.replace("$queue", queue)
    assert "$" not in out, out
    return out


def values(result: list[dict[str, Any]], label: str | None = None) -> dict[str, float]:
    """A vector as {label value: value} (``""`` for the one unlabelled sample)."""
    out: dict[str, float] = {}
    for sample in result:
        key = sample["metric"].get(label, "") if label else ""
        assert key not in out, result
        out[key] = float(sample["value"][1])
    return out


def one(result: list[dict[str, Any]]) -> float:
    [value] = values(result).values()
    return value


# --- tests --------------------------------------------------------------------------------------


@pytest.fixture()
def stack(tiny_model_dir: Path, s3_server: LoopbackS3, tmp_path: Path) -> Iterator[WorkerStack]:
    # A private Redis: the exporter reads kombu's unacked hash, which every queue shares.
    with WorkerStack(
        tiny_model_dir, s3_server, tmp_path, name="dashboard", task_defaults={"max_new_tokens": 4}
    ) as stack:
        yield stack


def test_the_shipped_prometheus_config_is_valid() -> None:
    require_prometheus()
    check = subprocess.run(
        [str(PROMTOOL), "check", "config", str(SHIPPED_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.timeout(240)
def test_every_dashboard_expression_evaluates_on_a_real_prometheus_and_shows_the_run(
    stack: WorkerStack, tiny_model_dir: Path, tmp_path: Path
) -> None:
    require_prometheus()
    queue = stack.queue
    metrics_port = free_port()
    worker = stack.worker("dash", CAPTION_METRICS_PORT=str(metrics_port), OMP_NUM_THREADS="1")
    exporter = ExporterProcess(stack.env(), queue, tmp_path / "exporter.log")
    prom: Prometheus | None = None
    try:
        exporter.wait_ready()
        config = prometheus_config(
            [f"127.0.0.1:{metrics_port}"], f"127.0.0.1:{exporter.port}", queue
        )
        prom = Prometheus(config, tmp_path / "prometheus").start()
        run = run_and_read(prom, stack, worker)
        worker_ready_at = run.pop("worker_ready_at")
        print(f"worker ready {worker_ready_at:.1f}s after the first send; {run['window']} window")
        check_run(run, queue, tiny_model_dir)
    finally:
        if prom is not None:
            prom.stop()
        exporter.stop()


def run_and_read(prom: Prometheus, stack: WorkerStack, worker: WorkerProcess) -> dict[str, Any]:
    """Queue the tasks, start the worker, drain, then read what the checks need."""
    queue = stack.queue
    # Prometheus hands static targets to its scrapers only after its discovery manager's
    # first update (about 5 s after start). Until then nothing is scraped, and a fast run
    # could finish before the worker's first sample: the window would then hold no 0 and
    # no increase. Wait for the first scrape, so the worker is scraped from its start.
    wait_for_value(
        lambda: prom.query(f'up{{job="{EXPORTER_JOB}"}}'), bool, 30, "Prometheus's first scrape",
        interval_s=0.2,
    )  # fmt: skip
    # Queue everything before the worker exists: the exporter reports all 20 waiting.
    image = stack.upload("plain.png")
    started = time.time()
    client = stack.client()
    try:
        ids = [client.submit(image, max_new_tokens=4) for _ in range(GOOD)]
        ids += [
            client.submit(f"s3://{stack.bucket}/missing-{i}.png", max_new_tokens=4)
            for i in range(MISSING)
        ]
    finally:
        client.close()
    worker.start().wait_ready(READY_TIMEOUT_S)
    worker_ready_at = time.time() - started
    metas = wait_for_value(
        lambda: [stack.meta(task_id) for task_id in ids],
        lambda metas: all(m["status"] in ("SUCCESS", "FAILURE") for m in metas),
        TASK_TIMEOUT_S,
        f"{TOTAL} tasks finish",
        interval_s=0.3,
    )
    finished = time.time()

    # Until Prometheus has scraped both processes twice after the last task ended (a series
    # born at the end then has the two samples rate() needs).
    def scraped() -> list[list[dict[str, Any]]]:
        return [
            prom.query(f'sum(caption_images_total{{queue="{queue}"}})'),
            prom.query(f'sum(caption_failures_total{{queue="{queue}"}})'),
            prom.query(f'min(timestamp(caption_worker_ready{{queue="{queue}"}}))'),
            prom.query(f'min(timestamp(caption_queue_waiting{{queue="{queue}"}}))'),
        ]

    wait_for_value(
        scraped,
        lambda got: (
            all(got)
            and [one(r) for r in got[:2]] == [GOOD, MISSING]
            and min(one(r) for r in got[2:]) > finished + 2 * SCRAPE_S
        ),
        30,
        "Prometheus scrapes the end of the run",
        interval_s=0.5,
    )
    # Evaluate at the worker's last scrape, over a window that covers the whole run: the
    # window's first worker samples are 0 and its last is at its end, so Prometheus
    # extrapolates neither way and rate x window is exactly the count.
    at = one(prom.query(f'max(timestamp(caption_worker_ready{{queue="{queue}"}}))'))
    window = f"{math.ceil(at - started) + 5}s"

    panels = dashboard_panels()
    # Every expression parses and evaluates, at a Grafana-like window and at the run's.
    evaluated = {
        (title, rate): [prom.query(substitute(e, queue, rate), at) for e in exprs]
        for title, exprs in panels.items()
        for rate in (RATE_INTERVAL, window)
    }

    def peak(title: str, index: int = 0) -> float:
        expr = substitute(panels[title][index], queue, window)
        return one(prom.query(f"max_over_time(({expr})[{window}:{SCRAPE_S}s])", at))

    def raw(expr: str) -> list[dict[str, Any]]:
        return prom.query(expr.replace("QUEUE", queue), at)

    return {
        "worker_ready_at": worker_ready_at,
        "window": window,
        "results": [m["result"] for m in metas if m["status"] == "SUCCESS"],
        "failures": [type(m["result"]).__name__ for m in metas if m["status"] == "FAILURE"],
        "panel": {title: result for (title, rate), result in evaluated.items() if rate == window},
        "peak_depth": peak("stat:Queue depth"),
        "peak_waiting": peak("timeseries:Queue depth", 0),
        "peak_work": peak("stat:Queued work"),
        "peak_oldest": peak("timeseries:Oldest waiting message"),
        "raw_outcomes": values(
            raw('sum by (outcome) (caption_tasks_total{queue="QUEUE"})'), "outcome"
        ),
        "raw_failures": values(raw('caption_failures_total{queue="QUEUE"}'), "type"),
        "raw_batch_rows": one(raw('sum(caption_batch_rows_sum{queue="QUEUE"})')),
        "raw_waits": one(raw('sum(caption_queue_wait_seconds_count{queue="QUEUE"})')),
        "up": values(prom.query("up", at), "job"),
        "queue_values": prom.api("label/queue/values", **{"match[]": "caption_queue_waiting"}),
    }


def check_run(run: dict[str, Any], queue: str, model_dir: Path) -> None:
    """The run's figures as the dashboard shows them."""
    results, panel = run["results"], run["panel"]
    seconds = float(run["window"].rstrip("s"))

    def about(rate: float, count: float) -> bool:
        """rate x window == count (no extrapolation, see run_and_read), up to rounding."""
        return math.isclose(rate * seconds, count, rel_tol=1e-6)

    assert len(results) == GOOD and run["failures"] == ["ImageNotFound"] * MISSING
    assert run["up"] == {WORKER_JOB: 1.0, EXPORTER_JOB: 1.0}, run["up"]
    # The queue variable's query, label_values(caption_queue_waiting, queue), finds it.
    assert queue in run["queue_values"]["data"], run["queue_values"]

    # Throughput: images and tokens over the run.
    [images] = panel["timeseries:Images / s"]
    # Both lanes exist from the worker's start; this run sent only interactive captions.
    assert sorted(values(images, "lane")) == ["bulk", "interactive"], images
    assert values(images, "lane")["bulk"] == 0.0, images
    assert about(values(images, "lane")["interactive"], GOOD), images
    assert about(one(panel["stat:Images / s"][0]), GOOD)
    tokens = values(panel["timeseries:Tokens / s"][0], "kind")
    assert about(tokens["prompt"], sum(r["prompt_tokens"] for r in results)), tokens
    assert about(tokens["generated"], sum(r["generated_tokens"] for r in results)), tokens

    # Outcomes and failures: exact in the counters, every series present from the start at 0
    # (so rate() sees the first increment too), and the rate panels show the same counts.
    assert run["raw_outcomes"] == {"success": GOOD, "failure": MISSING, "retry": 0}
    failed = {k: v for k, v in run["raw_failures"].items() if v}
    assert failed == {"ImageNotFound": MISSING}, run["raw_failures"]
    by_type = values(panel["timeseries:Failures / s by type"][0], "type")
    assert {k for k, v in by_type.items() if v} == {"ImageNotFound"}, by_type
    assert about(by_type["ImageNotFound"], MISSING), by_type
    outcomes = values(panel["timeseries:Task outcomes / s"][0], "outcome")
    assert about(outcomes["success"], GOOD) and about(outcomes["failure"], MISSING), outcomes
    assert outcomes["retry"] == 0, outcomes
    [failed_share] = values(panel["stat:Failed tasks"][0]).values()
    assert math.isclose(failed_share, MISSING / TOTAL), failed_share

    # The queue: all 20 waited while the model loaded, then it drained to nothing.
    assert run["peak_depth"] == TOTAL and run["peak_waiting"] == TOTAL, run
    assert run["peak_work"] > 0 and run["peak_oldest"] >= 1, run
    assert one(panel["stat:Queue depth"][0]) == 0
    waiting, reserved = (values(r, "queue") for r in panel["timeseries:Queue depth"])
    assert waiting == {queue: 0} and reserved == {queue: 0}, (waiting, reserved)
    assert values(panel["timeseries:Queued work"][0], "queue") == {queue: 0}
    assert values(panel["timeseries:Oldest waiting message"][0], "queue") == {queue: 0}
    assert one(panel["stat:Queued work"][0]) == 0
    assert run["raw_waits"] == TOTAL  # every message carried caption_sent_at
    p50, p95 = (one(r) for r in panel["timeseries:Queue wait p50 / p95"])
    assert 0 < p50 <= p95 <= seconds, (p50, p95)

    # The model: 16 rows, at most CAPTION_SLOTS=8 live in a decode step, each in one step per
    # token after its first (the slot engine's batch is a step's live rows).
    assert run["raw_batch_rows"] == sum(r["generated_tokens"] - 1 for r in results)
    mean_rows, p95_rows = (one(r) for r in panel["timeseries:Batch rows: mean and p95"])
    assert 1 <= mean_rows <= 8 and 1 <= p95_rows <= 8, (mean_rows, p95_rows)
    g50, g95 = (one(r) for r in panel["timeseries:Generate seconds p50 / p95"])
    assert 0 < g50 <= g95 <= seconds, (g50, g95)
    t50, t95 = (one(r) for r in panel["timeseries:Task seconds p50 / p95"])
    assert 0 < t50 <= t95 <= seconds, (t50, t95)
    assert [one(panel["timeseries:Rows active"][0])] == [0]

    # The fleet: one CPU worker, ready, no GPU memory, the tiny model; the exporter up.
    assert one(panel["stat:Workers ready"][0]) == 1
    assert one(panel["timeseries:Workers ready"][0]) == 1
    assert panel["timeseries:GPU memory"] == [[]]
    assert one(panel["stat:Exporter up"][0]) == 1
    assert one(panel["timeseries:Worker rate used for queued work"][0]) > 0
    [info] = panel["table:Model served"][0]
    assert info["metric"]["model"] == str(model_dir), info
    assert info["metric"]["dtype"] == "float32" and info["metric"]["queue"] == queue, info
    assert float(info["value"][1]) == 1
