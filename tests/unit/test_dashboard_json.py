"""The Grafana dashboard and the compose `monitoring` profile, read as files.

Every panel must query the dashboard's Prometheus datasource variable, and every metric an
expression names must be one that a worker (``worker.ops.metrics.Metrics``) or the exporter
(``worker.ops.exporter.QueueCollector``) really exports. That the expressions evaluate, and
show the right figures, is tests/process/test_dashboard.py's part (a real Prometheus).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client.core import Metric

from worker.ops.exporter import ExporterOptions, QueueCollector, TokenPolicy
from worker.ops.metrics import Metrics, _GpuMemory

DOCKER = Path(__file__).resolve().parents[2] / "docker"
DASHBOARD = DOCKER / "grafana" / "caption-worker.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
QUEUE_MATCHER = 'queue=~"$queue"'

# PromQL words that are neither metrics nor functions (functions are followed by "(").
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
KEYWORDS |= {"and", "or", "unless", "inf", "nan"}

# Every worker series of docs/operations.md and the exporter's queue and rate series.
MUST_SHOW = {
    "caption_tasks_total",
    "caption_failures_total",
    "caption_queue_wait_seconds_bucket",
    "caption_generate_seconds_bucket",
    "caption_batch_rows_bucket",
    "caption_batch_rows_sum",
    "caption_batch_rows_count",
    "caption_tokens_total",
    "caption_images_total",
    "caption_rows_active",
    "caption_model_info",
    "caption_gpu_memory_bytes",
    "caption_worker_ready",
    "caption_queue_waiting",
    "caption_queue_reserved",
    "caption_queue_oldest_age_seconds",
    "caption_queued_work_seconds",
    "caption_worker_tokens_per_second",
    "caption_exporter_up",
}


def sample_names(families: Iterable[Metric]) -> Iterator[str]:
    """The names a scrape shows for these families (counters' ``_total``, histograms' parts)."""
    for family in families:
        if family.type == "counter":
            yield f"{family.name}_total"
        elif family.type == "histogram":
            yield from (f"{family.name}{part}" for part in ("_bucket", "_sum", "_count"))
        else:
            yield family.name


def worker_names() -> set[str]:
    # The GPU collector yields nothing on a CPU; its describe() names the family.
    return set(sample_names([*Metrics().registry.collect(), *_GpuMemory().describe()]))


def exporter_names() -> set[str]:
    # describe() names every family without reading the broker (no connection is made).
    collector = QueueCollector(
        redis.Redis(), ExporterOptions(queues=("captions",)), TokenPolicy(default=128, limit=512)
    )
    return set(sample_names(collector.describe()))


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end() :].lstrip().startswith("(") or match.group() in KEYWORDS:
            continue
        names.add(match.group())
    return names


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, its label matchers) for each selector with matchers."""
    return re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}", expr)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


@pytest.fixture(scope="module")
def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def expressions(panels: list[dict[str, Any]]) -> list[str]:
    return [target["expr"] for panel in panels for target in panel["targets"]]


def test_the_dashboard_declares_its_datasource_and_queue_variables(
    dashboard: dict[str, Any],
) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    queue = variables["queue"]
    assert queue["type"] == "query" and queue["datasource"] == DATASOURCE
    assert queue["query"]["query"] == "label_values(caption_queue_waiting, queue)"
    assert queue["includeAll"] and queue["allValue"] == ".*"


def test_every_panel_queries_the_datasource_variable(panels: list[dict[str, Any]]) -> None:
    assert len(panels) >= 12
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_panels_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, panel["title"]
        taken |= cells


def test_every_metric_the_dashboard_uses_is_exported(panels: list[dict[str, Any]]) -> None:
    exported = worker_names() | exporter_names()
    used = set().union(*(metric_names(expr) for expr in expressions(panels)))
    assert used <= exported, sorted(used - exported)
    assert used >= MUST_SHOW, sorted(MUST_SHOW - used)


def test_queue_labelled_series_are_filtered_by_the_queue_variable(
    panels: list[dict[str, Any]],
) -> None:
    # Worker series carry the scrape's `queue` target label; the exporter's queue series
    # their own. Only the exporter's process-wide series have none.
    unlabelled = {"caption_worker_tokens_per_second", "caption_exporter_up"}
    for expr in expressions(panels):
        for name in metric_names(expr) - unlabelled:
            matched = [m for n, m in selectors(expr) if n == name]
            assert matched and all(QUEUE_MATCHER in m for m in matched), (name, expr)
        assert "$__rate_interval" in expr or "rate(" not in expr, expr


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le) (rate(caption_batch_rows_bucket{queue=~"a"}[5m])))'
        " / on (queue) group_left max(caption_exporter_up) or vector(0)"
    )
    assert metric_names(expr) == {"caption_batch_rows_bucket", "caption_exporter_up"}


# --- provisioning and compose ------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return loaded


def test_the_monitoring_profile_is_opt_in_and_pinned() -> None:
    services = compose()["services"]
    monitoring = {n for n, s in services.items() if "monitoring" in s.get("profiles", [])}
    assert monitoring == {"exporter", "prometheus", "grafana"}
    # Without a profile, `docker compose up` starts what it started before.
    default = {n for n, s in services.items() if not s.get("profiles")}
    assert default == {"redis", "minio", "minio-init", "worker-gpu0"}
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        tag = re.fullmatch(r"\$\{[A-Z_]+:-([^}]+)\}", image)
        assert tag and re.search(r":v?\d+\.\d+\.\d+$", tag.group(1)), image


def test_the_exporter_service_runs_the_worker_image_on_the_broker_only() -> None:
    services = compose()["services"]
    exporter = services["exporter"]
    assert exporter["image"] == services["worker-gpu0"]["image"]
    assert exporter["entrypoint"][-1] == "caption-worker"
    assert exporter["command"] == ["exporter", "--port", "9640", "--queue", "captions"]
    env = exporter["environment"]
    assert env["CAPTION_BROKER_URL"] == services["worker-gpu0"]["environment"]["CAPTION_BROKER_URL"]
    assert not [k for k in env if k.startswith(("AWS_", "HF_"))], env
    assert "9640" in " ".join(exporter["healthcheck"]["test"])


def test_prometheus_scrapes_the_compose_workers_and_the_exporter() -> None:
    services = compose()["services"]
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    [workers] = jobs["caption-worker"]["static_configs"]
    workers_in_compose = {n for n in services if n.startswith("worker-")}
    assert {t.split(":")[0] for t in workers["targets"]} == workers_in_compose
    assert {t.split(":")[1] for t in workers["targets"]} == {"9330"}
    assert workers["labels"]["queue"] == "captions" and jobs["caption-worker"]["honor_labels"]
    [exporter] = jobs["caption-exporter"]["static_configs"]
    assert exporter["targets"] == ["exporter:9640"]
    mounts = services["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    provisioning = DOCKER / "grafana" / "provisioning"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "caption.yaml").read_text())[
        "providers"
    ]
    folder = provider["options"]["path"]
    assert mounts[f"{folder}/caption-worker.json"] == "./grafana/caption-worker.json"
