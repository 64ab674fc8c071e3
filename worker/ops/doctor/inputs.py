"""What doctor is given to judge: the operator's options and the ``celeryconfig`` values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from types import ModuleType
from typing import Any

DEFAULT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class DoctorOptions:
    """What the operator asked for on the command line."""

    object_uri: str | None = None  # --object: an s3://bucket/key the worker must read
    timeout_s: float = DEFAULT_TIMEOUT_S  # --timeout: per network check


@dataclass(frozen=True)
class CeleryValues:
    """The ``celeryconfig`` values doctor judges, with Celery's own defaults when unset."""

    broker_url: str
    result_backend: str
    broker_use_ssl: Mapping[str, Any] | None = None
    redis_backend_use_ssl: Mapping[str, Any] | None = None
    worker_prefetch_multiplier: int = 4
    worker_concurrency: int | None = None
    worker_send_task_events: bool = False
    task_send_sent_event: bool = False
    result_expires: float | timedelta | None = timedelta(days=1)

    @classmethod
    def from_module(cls, module: ModuleType) -> CeleryValues:
        """Read a Celery configuration module; a missing name keeps Celery's default."""
        defaults = cls(broker_url="", result_backend="")
        values = {
            name: getattr(module, name, getattr(defaults, name))
            for name in cls.__dataclass_fields__
        }
        return cls(**values)
