"""Running every check: the network checks and the GPU probe concurrently, each bounded,
then the report lines in order. ``diagnose`` reads the environment and ``celeryconfig``."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from worker.engine.catalogue import resolve_model
from worker.engine.footprint import Footprint, estimate_footprint
from worker.errors import ConfigError
from worker.ops.doctor.background import Background, collect, network_limit
from worker.ops.doctor.config import (
    check_prefetch,
    check_result_expiry,
    check_task_events,
    check_visibility_timeout,
)
from worker.ops.doctor.gpu import GpuProbe, check_gpu, check_weights_fit, probe_gpus, wants_cpu
from worker.ops.doctor.inputs import CeleryValues, DoctorOptions
from worker.ops.doctor.model import check_model, find_model_files, hub_cache_dir
from worker.ops.doctor.report import CheckResult, Status, one_line
from worker.ops.doctor.services import check_broker, check_result_backend
from worker.ops.doctor.storage import s3_checks
from worker.settings import Settings, load_settings

#: torch import plus CUDA initialisation on every visible GPU; a driver that takes longer
#: than this is hung, and a worker on this host would hang the same way.
GPU_PROBE_LIMIT_S = 60.0


def _model_checks(
    settings: Settings, cache_dir: str | Path | None
) -> tuple[CheckResult, Footprint | str]:
    """The model line, and the footprint estimate (or why there is none)."""
    try:
        resolved = resolve_model(settings.model)
    except ConfigError as exc:
        return CheckResult("model", Status.FAIL, str(exc)), "CAPTION_MODEL is invalid (see model)"
    files = find_model_files(resolved, settings.revision, cache_dir)
    cache = hub_cache_dir(cache_dir)
    result = check_model(files, settings.auto_download, cache, settings.revision)
    if files.directory is None or files.missing:
        return result, (
            "the model's files are not on this machine, so its size is unknown; run doctor "
            "again once it is downloaded"
        )
    try:
        return result, estimate_footprint(files.directory, files.weight_files, settings)
    except Exception as exc:  # a checkpoint doctor cannot read; the worker may still load it
        return result, f"cannot read the model's size from its files ({one_line(exc)})"


def _gpu_lines(
    task: Background[GpuProbe] | None, footprint: Footprint | str, settings: Settings
) -> list[CheckResult]:
    """The gpu and weights-fit lines, once the probe (if any) has answered."""
    probe: GpuProbe | None = None
    if task is not None:
        try:
            probe = task.result(time.monotonic() + GPU_PROBE_LIMIT_S)
        except Exception as exc:
            failed = CheckResult(
                "gpu",
                Status.FAIL,
                f"torch could not query the GPUs ({one_line(exc)}); check the driver "
                "with nvidia-smi",
            )
            return [failed, CheckResult("weights fit", Status.SKIP, "no GPU information")]
    return [check_gpu(probe, settings.device), check_weights_fit(probe, footprint, settings)]


def run_checks(
    settings: Settings,
    celery: CeleryValues,
    options: DoctorOptions,
    *,
    cache_dir: str | Path | None = None,
    gpu_probe: Callable[[], GpuProbe] = probe_gpus,
) -> list[CheckResult]:
    """Every check, in report order. The network checks and the GPU probe run at once, each
    bounded, so a dead service costs about one timeout however many there are."""
    timeout = options.timeout_s
    broker = Background(lambda: [check_broker(celery.broker_url, celery.broker_use_ssl, timeout)])
    backend = Background(
        lambda: [check_result_backend(celery.result_backend, celery.redis_backend_use_ssl, timeout)]
    )
    s3 = Background(lambda: s3_checks(settings, options))
    # CAPTION_DEVICE=cpu needs no torch import (seconds on a small host) and no CUDA context.
    gpus = None if wants_cpu(settings.device) else Background(gpu_probe)
    deadline = time.monotonic() + network_limit(timeout)
    results = [
        *collect(["broker"], broker, deadline),
        *collect(["result backend"], backend, deadline),
        # s3_checks bounds each request itself; this covers building the boto3 client.
        *collect(["s3"], s3, deadline + 5),
        check_visibility_timeout(settings),
        check_prefetch(
            celery.worker_prefetch_multiplier, celery.worker_concurrency or settings.task_threads
        ),
        check_task_events(celery.worker_send_task_events, celery.task_send_sent_event),
        check_result_expiry(celery.result_expires),
    ]
    try:
        model, footprint = _model_checks(settings, cache_dir)
    except Exception as exc:  # an unreadable cache or config file: report, don't crash
        model = CheckResult("model", Status.FAIL, f"check failed: {one_line(exc)}")
        footprint = "the model check failed, so its size is unknown"
    return [*results, model, *_gpu_lines(gpus, footprint, settings)]


def diagnose(options: DoctorOptions) -> list[CheckResult]:
    """Run every check against this process's environment and ``celeryconfig``."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        return [CheckResult("settings", Status.FAIL, f"{exc}; fix the variable named")]
    import importlib

    # celeryconfig reads the same environment through worker.settings, once.
    celery = CeleryValues.from_module(importlib.import_module("celeryconfig"))
    return run_checks(settings, celery, options)
