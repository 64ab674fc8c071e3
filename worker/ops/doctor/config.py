"""The Celery settings a worker depends on: visibility timeout, prefetch, task events and
result expiry. Pure functions of the values; nothing is contacted."""

from __future__ import annotations

from datetime import timedelta

from worker.errors import ConfigError
from worker.ops.doctor.report import CheckResult, Status, human_duration
from worker.settings import Settings

#: Longest a result may be kept before doctor warns: at ~1.4 KB per result a week of a
#: million captions a day is ~10 GB of Redis.
MAX_RESULT_TTL_S = 7 * 86_400
RESULT_BYTES = 1_400  # one stored caption result, measured by ``bench --mode soak``


def check_visibility_timeout(settings: Settings) -> CheckResult:
    """Settings.check_visibility_timeout, as a report line (Redis brokers only)."""
    if not settings.broker_is_redis:
        return CheckResult(
            "visibility timeout",
            Status.SKIP,
            "not a Redis broker; on RabbitMQ keep consumer_timeout (default 30 min) above "
            f"CAPTION_TASK_DEADLINE_S={settings.task_deadline_s:g}",
        )
    try:
        settings.check_visibility_timeout()
    except ConfigError as exc:
        return CheckResult(
            "visibility timeout",
            Status.FAIL,
            f"{exc}; raise CAPTION_VISIBILITY_TIMEOUT_S or lower CAPTION_TASK_DEADLINE_S",
        )
    return CheckResult(
        "visibility timeout",
        Status.OK,
        f"CAPTION_VISIBILITY_TIMEOUT_S={settings.visibility_timeout_s} exceeds the "
        f"{settings.task_deadline_s:g} s task deadline with margin",
    )


def check_prefetch(multiplier: int, task_threads: int) -> CheckResult:
    """worker_prefetch_multiplier must be 1: each task thread holds only the task it runs."""
    if multiplier == 1:
        return CheckResult(
            "prefetch",
            Status.OK,
            f"worker_prefetch_multiplier=1: each of the {task_threads} task threads reserves "
            "only the task it runs",
        )
    held = "every waiting task" if multiplier <= 0 else f"{multiplier * task_threads} tasks"
    return CheckResult(
        "prefetch",
        Status.FAIL,
        f"worker_prefetch_multiplier={multiplier} lets one worker reserve {held}, which then "
        "wait behind its batches, hide from idle workers and the queue-depth autoscaler, and "
        "after a crash wait out the visibility timeout; set it to 1 in celeryconfig.py",
    )


def check_task_events(send_task_events: bool, send_sent_event: bool) -> CheckResult:
    """Task events on, so Flower and celery-exporter can see tasks."""
    off = [
        name
        for name, on in (
            ("worker_send_task_events", send_task_events),
            ("task_send_sent_event", send_sent_event),
        )
        if not on
    ]
    if not off:
        return CheckResult(
            "task events",
            Status.OK,
            "worker_send_task_events and task_send_sent_event are on: Flower and "
            "celery-exporter see every task",
        )
    return CheckResult(
        "task events",
        Status.WARN,
        f"{' and '.join(off)} off in celeryconfig.py: Flower and celery-exporter miss "
        "task events (queued, started, finished); turn them on",
    )


def _seconds(expires: float | timedelta | None) -> float | None:
    if isinstance(expires, timedelta):
        return expires.total_seconds()
    return None if expires is None else float(expires)


def check_result_expiry(result_expires: float | timedelta | None) -> CheckResult:
    """Results must expire, and soon enough that Redis does not fill up."""
    seconds = _seconds(result_expires)
    if not seconds:
        return CheckResult(
            "result expiry",
            Status.FAIL,
            f"result_expires={result_expires!r}: results never expire and Redis fills up; "
            "set CAPTION_RESULT_EXPIRES_S (default 86400)",
        )
    if seconds > MAX_RESULT_TTL_S:
        per_million = RESULT_BYTES * 1_000_000 * seconds / 86_400
        return CheckResult(
            "result expiry",
            Status.WARN,
            f"results are kept {human_duration(seconds)}: about {per_million / 1e9:.0f} GB of "
            "Redis per million captions a day; lower CAPTION_RESULT_EXPIRES_S to what producers "
            "need",
        )
    return CheckResult(
        "result expiry", Status.OK, f"results expire after {human_duration(seconds)}"
    )
