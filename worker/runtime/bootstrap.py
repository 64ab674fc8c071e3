"""The one place a worker is wired together: engine, runner, object store, service.

The Celery worker (through the lifecycle), local captions and the benchmark all build
their stack here, so a new engine or a metrics hook is added once. The metrics hook reaches
the runner and the service from here; without one, nothing is recorded.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from worker.batching.batcher import Batcher
from worker.batching.policy import BatchLimits
from worker.engine.base import BatchEngine, CaptionEngine, RowRunner
from worker.errors import ConfigError
from worker.ops.metrics import NO_METRICS, MetricsHook
from worker.runtime.service import CaptionService
from worker.settings import Settings
from worker.storage.s3 import ObjectStore

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], BatchEngine]


def load_factory(path: str) -> EngineFactory:
    """Import ``module:function`` (CAPTION_ENGINE_FACTORY)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"CAPTION_ENGINE_FACTORY={path!r} must look like 'module:function'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"CAPTION_ENGINE_FACTORY={path!r} cannot be imported: {exc}") from None
    return cast(EngineFactory, factory)


def load_engine(settings: Settings) -> CaptionEngine:
    """Load the model through the configured factory, in the configured engine.

    Raises ModelLoadError or ConfigError.
    """
    engine = load_factory(settings.engine_factory)(settings)
    if settings.engine == "generate":
        return engine
    from worker.engine.hf_generate import GenerateEngine
    from worker.engine.slot_engine import SlotEngine

    if isinstance(engine, SlotEngine):
        return engine  # the factory built the slot engine itself (fault-injection tests)
    if not isinstance(engine, GenerateEngine):
        if "engine" not in settings.model_fields_set:
            # A custom factory's own engine, from before slots were the default: serve it
            # the way it was written for rather than refuse to start.
            log.info(
                "%s returned a %s, which the slot engine cannot wrap: serving whole batches",
                settings.engine_factory,
                type(engine).__name__,
            )
            return engine
        raise ConfigError(
            f"CAPTION_ENGINE=slots needs CAPTION_ENGINE_FACTORY ({settings.engine_factory}) "
            "to return a GenerateEngine"
        )
    from worker.engine.kv_budget import free_device_bytes, kv_bytes_per_slot, slots_that_fit
    from worker.engine.loading import ACTIVATION_MARGIN_BYTES

    free = free_device_bytes(engine.info.device)
    count = slots_that_fit(
        settings.slot_count,
        explicit=settings.slots is not None,
        per_slot=kv_bytes_per_slot(engine.model, settings.slot_capacity),
        room=None if free is None else free - ACTIVATION_MARGIN_BYTES,
        capacity=settings.slot_capacity,
    )
    slots = SlotEngine(engine, count, settings.slot_capacity, cuda_graphs=settings.cuda_graphs)
    log.info(
        "slot engine: %d slots of %d tokens, KV cache %.2f GiB",
        slots.slots,
        slots.capacity,
        slots.cache.nbytes / 2**30,
    )
    return slots


def make_runner(
    engine: CaptionEngine,
    settings: Settings,
    limits: BatchLimits,
    metrics: MetricsHook = NO_METRICS,
    on_device_failure: Callable[[BaseException], None] | None = None,
) -> RowRunner:
    """The model thread for ``engine``: the slot runner for a slot engine, else the
    whole-batch batcher.

    ``on_device_failure`` is called with an error that left the device unusable (see
    ``worker.engine.base.device_failed``); without it such an error fails its rows only.
    """
    if settings.engine == "slots":
        from worker.batching.slot_runner import SlotRunner
        from worker.engine.slot_engine import SlotEngine

        if isinstance(engine, SlotEngine):
            return SlotRunner(engine, metrics, on_device_failure)
    return Batcher(cast(BatchEngine, engine), limits, metrics, on_device_failure)


def batch_limits(settings: Settings) -> BatchLimits:
    """The batching knobs from settings."""
    return BatchLimits(
        max_batch=settings.max_batch,
        wait_s=settings.batch_wait_ms / 1000,
        linger_s=settings.batch_linger_ms / 1000,
        token_budget=settings.batch_token_budget,
        pad_ratio=settings.batch_pad_ratio,
    )


@dataclass
class Runtime:
    """A wired worker: the service and the pieces it runs on."""

    settings: Settings
    engine: CaptionEngine
    runner: RowRunner
    service: CaptionService

    def start(self) -> Runtime:
        """Start the model thread."""
        self.runner.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Let submitted rows finish, then stop the model thread."""
        self.runner.stop(timeout)


def build_runtime(
    settings: Settings,
    worker_name: str,
    *,
    engine: CaptionEngine | None = None,
    limits: BatchLimits | None = None,
    metrics: MetricsHook = NO_METRICS,
    on_device_failure: Callable[[BaseException], None] | None = None,
) -> Runtime:
    """Wire a worker around ``engine`` (loaded from settings when not given); not started.

    ``metrics`` records what the runner and the service report (nothing by default);
    ``on_device_failure`` see ``make_runner``.
    """
    engine = engine if engine is not None else load_engine(settings)
    metrics.model_loaded(engine.info)
    runner = make_runner(
        engine, settings, limits or batch_limits(settings), metrics, on_device_failure
    )
    service = CaptionService(
        settings, engine, ObjectStore(settings), runner, worker_name, metrics=metrics
    )
    return Runtime(settings, engine, runner, service)
