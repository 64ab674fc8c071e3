"""The metrics hook: what each component reports shows up as the series an operator reads.

Runners, the service and the hook run for real against fake engines; values are read back
from each ``Metrics`` object's own registry, as a scrape would see them.
"""

from __future__ import annotations

import math
import time
from typing import Any, cast

import pytest
import torch

from tests.support.batching import settle
from tests.support.fake_engine import FakeEngine, item
from tests.support.images import png_bytes
from tests.unit.test_slot_runner import FakeSlots, row
from worker.batching.batcher import Batcher
from worker.batching.policy import BatchLimits
from worker.batching.slot_runner import SlotRunner
from worker.contract import parse_request
from worker.engine.base import CaptionOutput, ModelInfo
from worker.engine.catalogue import ResolvedModel
from worker.engine.slot_engine import SlotEngine
from worker.errors import ImageNotFound, InvalidImage, StorageUnavailable
from worker.ops.metrics import (
    NO_METRICS,
    Metrics,
    MetricsHook,
    NullMetrics,
    failure_type,
    quantization_label,
    queue_wait_seconds,
)
from worker.runtime.service import CaptionService
from worker.settings import Settings
from worker.storage.s3 import ObjectStore


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def names(metrics: Metrics) -> set[str]:
    return {family.name for family in metrics.registry.collect()}


def test_two_workers_in_one_process_keep_their_own_numbers() -> None:
    first, second = Metrics(), Metrics()  # the same series names, no collision
    first.task_finished("captions", "success", 0.5)
    assert value(first, "caption_tasks_total", queue="captions", outcome="success") == 1
    assert value(second, "caption_tasks_total", queue="captions", outcome="success") is None


def test_every_documented_series_is_exposed_from_the_start() -> None:
    metrics = Metrics()
    assert {
        "caption_tasks",
        "caption_failures",
        "caption_queue_wait_seconds",
        "caption_task_seconds",
        "caption_generate_seconds",
        "caption_batch_rows",
        "caption_tokens",
        "caption_images",
        "caption_rows_active",
        "caption_model_info",
        "caption_worker_ready",
    } <= names(metrics)
    # Counters a dashboard sums are 0, not "no data", before the first caption.
    assert value(metrics, "caption_tokens_total", kind="prompt") == 0
    assert value(metrics, "caption_tokens_total", kind="generated") == 0
    assert value(metrics, "caption_images_total", lane="interactive") == 0
    assert value(metrics, "caption_images_total", lane="bulk") == 0


def test_task_outcomes_and_failure_types_are_counted() -> None:
    metrics = Metrics()
    metrics.task_finished("captions", "success", 1.0)
    metrics.task_finished("captions", "failure", 0.1, ImageNotFound("gone"))
    metrics.task_finished("captions", "failure", 0.1, ImageNotFound("gone too"))
    metrics.task_finished("captions", "failure", 0.2, InvalidImage("not a PNG"))
    metrics.task_finished("captions", "failure", 0.2, KeyError("a bug"))
    metrics.task_finished("captions", "retry", 0.3, StorageUnavailable("503"))

    def tasks(outcome: str) -> float | None:
        return value(metrics, "caption_tasks_total", queue="captions", outcome=outcome)

    assert (tasks("success"), tasks("failure"), tasks("retry")) == (1, 4, 1)
    assert value(metrics, "caption_failures_total", type="ImageNotFound") == 2
    assert value(metrics, "caption_failures_total", type="InvalidImage") == 1
    assert value(metrics, "caption_failures_total", type="Internal") == 1
    # A retry is not a failure: the task may still succeed.
    assert value(metrics, "caption_failures_total", type="StorageUnavailable") == 0
    assert value(metrics, "caption_task_seconds_count") == 6
    assert value(metrics, "caption_task_seconds_sum") == pytest.approx(1.9)


def test_failure_and_outcome_series_exist_at_zero_before_the_first_task() -> None:
    # rate() cannot see a series' first sample: a failure type born at its first increment
    # would not show on a dashboard.
    metrics = Metrics()
    metrics.serve_queue("captions")
    assert value(metrics, "caption_failures_total", type="ImageNotFound") == 0
    assert value(metrics, "caption_failures_total", type="Internal") == 0
    for outcome in ("success", "failure", "retry"):
        assert value(metrics, "caption_tasks_total", queue="captions", outcome=outcome) == 0


def test_failure_type_is_the_name_producers_see_or_internal() -> None:
    assert failure_type(InvalidImage("x")) == "InvalidImage"
    assert failure_type(ValueError("x")) == "Internal"


def test_model_info_names_the_model_and_a_reload_replaces_it() -> None:
    metrics = Metrics()
    quant = {
        "quant_method": "sdnq",
        "weights_dtype": "uint4",
        "use_svd": True,
        "svd_rank": 32,
        "served_as": "sdnq",
    }
    resolved = ResolvedModel("Qwen3-VL-8B-SDNQ", "org/repo", False, None)
    info = ModelInfo(resolved, "cuda:0", {"revision": "abc123", "quantization": quant})
    info.provenance["dtype"] = "bfloat16"
    metrics.model_loaded(info)
    labels = {
        "model": "Qwen3-VL-8B-SDNQ",
        "revision": "abc123",
        "quantization": "sdnq-uint4-svd32",
        "dtype": "bfloat16",
    }
    assert value(metrics, "caption_model_info", **labels) == 1

    metrics.model_loaded(ModelInfo(resolved, "cpu", {"dtype": "float32"}))
    assert value(metrics, "caption_model_info", **labels) is None
    labels.update(revision="", quantization="none", dtype="float32")
    assert value(metrics, "caption_model_info", **labels) == 1


@pytest.mark.parametrize(
    ("quantization", "label"),
    [
        (None, "none"),
        ({}, "none"),
        ({"quant_method": "sdnq", "weights_dtype": "int8"}, "sdnq-int8"),
        (
            {"quant_method": "sdnq", "weights_dtype": "uint4", "use_svd": True, "svd_rank": 32,
             "served_as": "bf16"},
            "sdnq-uint4-svd32 as bf16",
        ),
    ],
)  # fmt: skip
def test_quantization_label(quantization: dict[str, Any] | None, label: str) -> None:
    assert quantization_label(quantization) == label


@pytest.mark.parametrize(
    ("sent_at", "wait"),
    [(97.5, 2.5), (100, 0.0), (103.0, 0.0), ("97.5", None), (True, None), (None, None)],
)
def test_queue_wait_from_the_send_timestamp(sent_at: object, wait: float | None) -> None:
    # A producer's clock ahead of the worker's must not make a negative wait.
    assert queue_wait_seconds(sent_at, now=100.0) == wait


def test_queue_wait_ignores_values_that_are_not_times() -> None:
    assert queue_wait_seconds(math.nan, now=100.0) is None
    assert queue_wait_seconds(math.inf, now=100.0) is None


def test_ready_gauge_follows_the_lifecycle_at_each_scrape() -> None:
    metrics = Metrics()
    state = {"ready": False}
    metrics.watch_ready(lambda: state["ready"])
    assert value(metrics, "caption_worker_ready") == 0
    state["ready"] = True
    assert value(metrics, "caption_worker_ready") == 1


def test_gpu_memory_is_absent_while_cuda_is_not_in_use() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("this process uses CUDA")
    assert "caption_gpu_memory_bytes" not in names(Metrics())


def test_gpu_memory_sums_torchs_allocator_over_the_visible_devices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No GPU here: torch.cuda answers as it would with two devices in use.
    class Props:
        total_memory = 80 * 2**30

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: (d + 1) * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: (d + 1) * 2**31)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props())
    metrics = Metrics()
    assert value(metrics, "caption_gpu_memory_bytes", kind="allocated") == 3 * 2**30
    assert value(metrics, "caption_gpu_memory_bytes", kind="reserved") == 3 * 2**31
    assert value(metrics, "caption_gpu_memory_bytes", kind="total") == 160 * 2**30

    def broken(device: int) -> int:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "memory_allocated", broken)
    # A driver in trouble leaves the series out; the scrape itself still works.
    assert "caption_gpu_memory_bytes" not in names(metrics)
    assert "caption_tasks" in names(metrics)


def test_the_null_hook_has_the_whole_surface() -> None:
    hook: MetricsHook = NullMetrics()
    hook.task_finished("q", "success", 1.0)
    hook.queue_waited(1.0)
    hook.model_batch(3)
    hook.model_time(1.0)
    hook.rows_active(2)
    hook.caption_delivered("interactive", 10, 5)
    assert NO_METRICS is not None
    real = {n for n in dir(Metrics) if not n.startswith("_")}
    assert {n for n in dir(NullMetrics) if not n.startswith("_")} <= real


# --- Runners -----------------------------------------------------------------------------------


def test_the_batcher_reports_each_generate_call() -> None:
    metrics = Metrics()
    engine = FakeEngine()
    batcher = Batcher(engine, BatchLimits(max_batch=3, wait_s=1.0, linger_s=0.5), metrics)
    batcher.start()
    try:
        with batcher._cond:  # all seven wait before the batcher looks
            futures = [batcher.submit(item(i), time.monotonic() + 30) for i in range(1, 8)]
        settle(batcher, futures)
    finally:
        batcher.stop(timeout=5)

    assert engine.sizes() == [3, 3, 1]
    assert value(metrics, "caption_batch_rows_count") == 3
    assert value(metrics, "caption_batch_rows_sum") == 7
    assert value(metrics, "caption_generate_seconds_count") == 3
    assert value(metrics, "caption_rows_active") == 0


def test_the_batcher_counts_calls_that_ran_out_of_memory() -> None:
    metrics = Metrics()
    engine = FakeEngine(oom_above=2)
    batcher = Batcher(engine, BatchLimits(max_batch=4, wait_s=1.0, linger_s=0.5), metrics)
    batcher.start()
    try:
        with batcher._cond:
            futures = [batcher.submit(item(i), time.monotonic() + 30) for i in range(1, 5)]
        outputs = settle(batcher, futures)
    finally:
        batcher.stop(timeout=5)

    assert all(isinstance(o, CaptionOutput) for o in outputs), outputs
    assert engine.sizes() == [4, 2, 2]  # the failed call took model time too
    assert value(metrics, "caption_batch_rows_sum") == 8
    assert value(metrics, "caption_generate_seconds_count") == 3


def test_the_slot_runner_reports_rows_per_step_and_each_rows_time() -> None:
    metrics = Metrics()
    engine = FakeSlots(slots=2)
    runner = SlotRunner(cast(SlotEngine, engine), metrics)
    runner.start()
    try:
        with runner._cond:
            futures = [runner.submit(row(i, tokens=3), time.monotonic() + 30) for i in range(4)]
        outputs = settle(runner, futures)
    finally:
        runner.stop(timeout=5)

    assert all(isinstance(o, CaptionOutput) for o in outputs), outputs
    # Two rows at a time, each two decode steps after its prefill: four steps of two rows.
    assert value(metrics, "caption_batch_rows_count") == 4
    assert value(metrics, "caption_batch_rows_sum") == 8
    assert value(metrics, "caption_generate_seconds_count") == 4  # one per finished row
    assert value(metrics, "caption_rows_active") == 0


# --- Service -----------------------------------------------------------------------------------


def test_the_service_counts_delivered_captions_and_their_tokens() -> None:
    metrics = Metrics()
    settings = Settings(max_new_tokens_limit=64)
    engine = FakeEngine()
    batcher = Batcher(engine, BatchLimits(max_batch=1), metrics)
    service = CaptionService(
        settings, engine, ObjectStore(settings, client=object()), batcher, "test", metrics
    )
    batcher.start()
    try:
        results = [
            service.caption(parse_request({"image": "a.png", "max_new_tokens": n}, settings), png)
            for n, png in ((7, png_bytes()), (11, png_bytes((40, 40))))
        ]
    finally:
        batcher.stop(timeout=5)

    assert value(metrics, "caption_images_total", lane="interactive") == 2
    assert value(metrics, "caption_tokens_total", kind="prompt") == sum(
        r.prompt_tokens for r in results
    )
    assert value(metrics, "caption_tokens_total", kind="generated") == 18
