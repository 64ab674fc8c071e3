"""The Kubernetes manifests in docker/k8s: schema-valid, and consistent with each other.

Core kinds are checked against Kubernetes' own OpenAPI schemas (kubernetes-validate, strict:
unknown fields fail, as ``kubectl apply --validate=strict`` would). KEDA's kinds are checked
against the CRD schemas KEDA installs (vendored under tests/fixtures/k8s), with unknown fields
refused the same way. Then the cross-file facts an operator relies on: each ScaledObject
scales a Deployment that exists and consumes the queue its query measures, the lanes'
Deployments do not select each other's pods, and their pods differ only where meant.
"""

from __future__ import annotations

import copy
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
CRDS = ROOT / "tests" / "fixtures" / "k8s"
KUBERNETES_VERSION = "1.33.0"
DEFAULTS = Settings.model_fields


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path.name, doc))
    return found


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in documents() if d["kind"] == kind}


def _strict(schema: Any) -> Any:
    """Refuse fields the schema does not name (Kubernetes prunes them silently otherwise)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the CRD's OpenAPI v3 schema, made strict."""
    schemas = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            schemas[(f"{group}/{version['name']}", kind)] = _strict(schema)
    return schemas


@pytest.mark.parametrize("name, doc", documents(), ids=[f"{n}:{d['kind']}" for n, d in documents()])
def test_every_manifest_is_schema_valid(name: str, doc: dict[str, Any]) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key in crd_schemas():
        jsonschema.validate(doc, crd_schemas()[key])
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_strict_checks_catch_a_misspelt_field() -> None:
    scaled = copy.deepcopy(of_kind("ScaledObject")["caption-worker"])
    scaled["spec"]["minReplicas"] = 1  # KEDA calls it minReplicaCount
    key = (scaled["apiVersion"], scaled["kind"])
    with pytest.raises(jsonschema.ValidationError, match="minReplicas"):
        jsonschema.validate(scaled, crd_schemas()[key])
    deployment = copy.deepcopy(of_kind("Deployment")["caption-worker"])
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 720
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def _queue_of(deployment: dict[str, Any]) -> str:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    for var in container.get("env", []):
        if var["name"] == "CAPTION_QUEUE":
            return str(var["value"])
    return str(of_kind("ConfigMap")["caption-worker-config"]["data"]["CAPTION_QUEUE"])


def test_each_lane_scales_a_deployment_on_the_queue_it_consumes() -> None:
    deployments = of_kind("Deployment")
    scaled = of_kind("ScaledObject")
    lanes = {}
    for name, obj in scaled.items():
        target = deployments[obj["spec"]["scaleTargetRef"]["name"]]
        (trigger,) = obj["spec"]["triggers"]
        assert trigger["type"] == "prometheus", name
        query = trigger["metadata"]["query"]
        assert re.fullmatch(r'sum\(caption_queued_work_seconds\{queue="[^"]+"\}\)', query), query
        assert f'queue="{_queue_of(target)}"' in query, (name, query)
        lanes[obj["metadata"]["labels"]["app.kubernetes.io/component"]] = obj["spec"]
    # Interactive keeps a warm floor (model loads take minutes); bulk scales to zero and
    # wakes on queued work.
    assert lanes["interactive"]["minReplicaCount"] >= 1
    assert lanes["bulk"]["minReplicaCount"] == 0
    assert float(lanes["bulk"]["triggers"][0]["metadata"]["activationThreshold"]) > 0
    # The exporter measures every queue a lane scales on.
    exporter = deployments["caption-exporter"]["spec"]["template"]["spec"]["containers"][0]
    queues = {exporter["args"][i + 1] for i, a in enumerate(exporter["args"]) if a == "--queue"}
    targets = [deployments[o["spec"]["scaleTargetRef"]["name"]] for o in scaled.values()]
    assert queues == {_queue_of(target) for target in targets}


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_no_deployment_selects_another_deployments_pods() -> None:
    deployments = of_kind("Deployment")
    for name, dep in deployments.items():
        selector = dep["spec"]["selector"]["matchLabels"]
        assert _matches(selector, dep["spec"]["template"]["metadata"]["labels"]), name
        for other, odep in deployments.items():
            if other != name:
                labels = odep["spec"]["template"]["metadata"]["labels"]
                assert not _matches(selector, labels), f"{name} would adopt {other}'s pods"


def test_the_lanes_run_the_same_pod_but_for_name_labels_and_queue() -> None:
    deployments = of_kind("Deployment")
    interactive = copy.deepcopy(deployments["caption-worker"]["spec"]["template"])
    bulk = copy.deepcopy(deployments["caption-worker-bulk"]["spec"]["template"])
    for template in (interactive, bulk):
        del template["metadata"]["labels"]["app.kubernetes.io/component"]
        container = template["spec"]["containers"][0]
        container["env"] = [v for v in container["env"] if v["name"] != "CAPTION_QUEUE"]
    assert interactive == bulk


def test_worker_pods_expose_metrics_where_prometheus_looks() -> None:
    for name in ("caption-worker", "caption-worker-bulk"):
        template = of_kind("Deployment")[name]["spec"]["template"]
        (container,) = template["spec"]["containers"]
        port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
        assert port == DEFAULTS["metrics_port"].default
        assert template["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_grace_period_outlasts_the_longest_task() -> None:
    config = of_kind("ConfigMap")["caption-worker-config"]["data"]
    deadline = float(config["CAPTION_TASK_DEADLINE_S"])
    hang_grace = float(DEFAULTS["hang_grace_s"].default)
    for name in ("caption-worker", "caption-worker-bulk"):
        spec = of_kind("Deployment")[name]["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] >= deadline + hang_grace, name
    bulk = of_kind("ScaledObject")["caption-worker-bulk"]["spec"]
    assert bulk["cooldownPeriod"] > deadline
