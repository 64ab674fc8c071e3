"""Typed worker settings, read once from the environment at process start.

Every variable carries the ``CAPTION_`` prefix. S3 credentials, region and endpoint follow
boto3's own variables (``AWS_*``) and Hugging Face's follow its own (``HF_HOME``,
``HF_HUB_OFFLINE``); they are not repeated here.
"""

from __future__ import annotations

import functools
from typing import Annotated, Literal, Self

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.errors import ConfigError

ENV_PREFIX = "CAPTION_"
# How long past its deadline a task thread waits for the batcher to answer: the batcher
# stops the row at the next decode step, so this only covers one step and bookkeeping.
DEADLINE_GRACE_S = 5.0
DEFAULT_MODEL = "Qwen3-VL-32B-Instruct-SDNQ-uint4"
LOCAL_REDIS = "redis://127.0.0.1:6379/0"


class Settings(BaseSettings):
    """Everything the worker, the producer client and the CLI read from the environment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, validate_default=True
    )

    # Broker and results.
    broker_url: str = LOCAL_REDIS
    result_backend: str = LOCAL_REDIS
    queue: str = "captions"
    # The queue of bulk shard tasks this worker also consumes (after its own); empty: none.
    bulk_queue: str = "captions-bulk"
    result_expires_s: int = Field(86_400, ge=60)
    # Redis: how long a reserved, unacknowledged task stays invisible to other workers.
    visibility_timeout_s: int = Field(3_600, ge=5)
    # How often a Redis worker looks for unacknowledged tasks of dead workers to restore.
    unacked_restore_interval_s: float = Field(10.0, gt=0)
    # Redis broker: each worker beats this often; a worker silent for WORKER_DEAD_AFTER_S is
    # dead and a live worker hands its deliveries back to the queue at once, instead of
    # after the visibility timeout.
    heartbeat_interval_s: float = Field(5.0, gt=0)
    # RabbitMQ broker: the server's consumer_timeout (30 minutes unless rabbitmq.conf says
    # otherwise). A delivery unacknowledged that long closes the worker's channel and the
    # task runs again elsewhere, so every task must end well within it.
    amqp_consumer_timeout_s: int = Field(1_800, ge=5)
    worker_dead_after_s: float = Field(20.0, gt=0)
    # Path to CA bundle for rediss:// URLs; certificates are always verified.
    redis_ca_certs: str | None = None

    # Model.
    model: str = DEFAULT_MODEL
    revision: str | None = None
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    memory_mode: Literal["gpu", "balanced", "lowvram"] = "gpu"
    auto_download: bool = True
    device: str | None = None  # "cuda", "cuda:1" or "cpu"; None picks CUDA when present
    engine_factory: str = "worker.engine.hf_generate:load_engine"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # SDNQ's int matmul path; measured slower than dequantize-then-matmul for decoding.
    sdnq_quantized_matmul: bool = False
    # slots: continuous batching, rows join and leave between decode steps over a static KV
    # cache. generate: one Hugging Face generate() per batch (the reference engine). The slot
    # engine runs the decoder layer by layer itself, so it needs every weight on the
    # execution device: with CAPTION_MEMORY_MODE balanced or lowvram the default is generate.
    engine: Literal["generate", "slots"] = "slots"
    # How SDNQ weights are served: as stored (least memory), dequantized once to
    # CAPTION_DTYPE ("bf16"), or re-quantized to int8 with quantized matmul.
    weights: Literal["sdnq", "bf16", "int8"] = "sdnq"
    slots: int | None = Field(None, ge=1, le=1_024)  # rows decoding together; default max_batch
    slot_tokens: int | None = Field(None, ge=64)  # KV capacity per slot; default from limits
    # The slot engine's decode step through captured CUDA graphs (CUDA only; a failed capture
    # falls back to the eager step with a warning).
    cuda_graphs: bool = True

    # Requests.
    default_prompt: str = "Describe this image."
    max_prompt_chars: int = Field(4_000, ge=1)
    max_new_tokens_limit: int = Field(4_096, ge=1, le=32_768)
    max_pixels: int = Field(1_048_576, ge=1_024)  # resize budget per image
    min_pixels: int = Field(65_536, ge=1_024)
    # A caption whose last REPETITION_SPAN tokens repeat a cycle of at most
    # REPETITION_MAX_CYCLE tokens stops with finish_reason "repetition"; span 0 turns it off.
    repetition_span: int = Field(48, ge=0)
    repetition_max_cycle: int = Field(8, ge=1)
    task_deadline_s: float = Field(600.0, gt=0)
    visibility_margin_s: float = Field(60.0, ge=0)
    max_deliveries: int = Field(3, ge=1)
    # A generate call this long past the task deadline is hung (a stuck kernel or driver):
    # the process exits so its unacknowledged tasks go to a healthy worker.
    # Must exceed DEADLINE_GRACE_S, so a hung task is reported as CaptionTimeout first.
    hang_grace_s: float = Field(120.0, gt=DEADLINE_GRACE_S)

    # Batching.
    max_batch: int = Field(32, ge=1, le=1_024)
    batch_wait_ms: int = Field(500, ge=0)
    batch_linger_ms: int = Field(25, ge=0)
    batch_token_budget: int = Field(262_144, ge=1_024)
    batch_pad_ratio: float = Field(2.0, ge=1.0)
    concurrency: int | None = Field(None, ge=1)  # task threads; default max_batch + 4

    # Images and storage.
    allowed_buckets: Annotated[tuple[str, ...], NoDecode] = ()
    # Buckets bulk runs may write (run files, sidecars); parsed like allowed_buckets, and
    # empty allows any.
    output_buckets: Annotated[tuple[str, ...], NoDecode] = ()
    max_image_bytes: int = Field(50 * 1024 * 1024, ge=1)
    max_decoded_pixels: int = Field(100_000_000, ge=1)
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    s3_connect_timeout_s: float = Field(5.0, gt=0)
    s3_read_timeout_s: float = Field(30.0, gt=0)
    s3_max_attempts: int = Field(4, ge=1)
    storage_retries: int = Field(3, ge=0)
    storage_retry_backoff_s: float = Field(2.0, ge=0)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Written once the model has answered a warm-up caption and the consumer is connected,
    # removed at shutdown: a readiness probe for orchestrators (``test -f``).
    ready_file: str | None = None

    # Operations.
    # Port of the process's /metrics, /healthz and /readyz server (all interfaces); 0 turns
    # it off. `caption-worker worker` gives GPU process i the port metrics_port + i.
    metrics_port: int = Field(9330, ge=0, le=65_535)

    @field_validator("allowed_buckets", "output_buckets", mode="before")
    @classmethod
    def _split_buckets(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(b.strip() for b in value.split(",") if b.strip())
        return value

    @model_validator(mode="before")
    @classmethod
    def _engine_for_memory_mode(cls, data: object) -> object:
        # accelerate moves a spilled or streamed layer's weights in hooks on whole blocks;
        # the slot engine's decode step calls the blocks' parts directly and would bypass
        # them, so only the whole-batch engine serves those memory modes.
        if not isinstance(data, dict) or data.get("memory_mode", "gpu") == "gpu":
            return data
        if data.get("engine") is None:
            return {**data, "engine": "generate"}
        if data["engine"] == "slots":
            raise ValueError(
                f"CAPTION_ENGINE=slots needs CAPTION_MEMORY_MODE=gpu (every weight on the "
                f"GPU), not {data['memory_mode']}: use CAPTION_ENGINE=generate, or "
                "CAPTION_WEIGHTS=int8 or sdnq to fit the model on one GPU"
            )
        return data

    @model_validator(mode="after")
    def _check_together(self) -> Self:
        if self.min_pixels > self.max_pixels:
            raise ValueError("CAPTION_MIN_PIXELS must not exceed CAPTION_MAX_PIXELS")
        if self.worker_dead_after_s < 3 * self.heartbeat_interval_s:
            raise ValueError(
                "CAPTION_WORKER_DEAD_AFTER_S must be at least three times "
                "CAPTION_HEARTBEAT_INTERVAL_S, so one late beat does not declare a worker dead"
            )
        if 0 < self.repetition_span < 2 * self.repetition_max_cycle:
            raise ValueError(
                "CAPTION_REPETITION_SPAN must be 0 (off) or at least twice "
                "CAPTION_REPETITION_MAX_CYCLE"
            )
        return self

    @property
    def slot_count(self) -> int:
        """Rows the slot engine decodes together."""
        return self.slots or self.max_batch

    @property
    def slot_capacity(self) -> int:
        """Tokens one slot holds: by default a full-budget image, a long prompt and up to
        1,024 new tokens; a row that needs more runs alone through ``generate``."""
        if self.slot_tokens is not None:
            return self.slot_tokens
        return self.max_pixels // (32 * 32) + 512 + min(1_024, self.max_new_tokens_limit)

    @property
    def model_rows(self) -> int:
        """Rows the model works on at once: the slots, or the largest generate batch."""
        return self.slot_count if self.engine == "slots" else self.max_batch

    @property
    def task_threads(self) -> int:
        """Task threads per worker: enough to fill every slot (or a batch) while the next
        rows download."""
        return self.concurrency or self.model_rows + 4

    @property
    def broker_is_redis(self) -> bool:
        """Whether the broker is Redis (visibility timeout, heartbeat recovery apply)."""
        return self.broker_url.startswith(("redis://", "rediss://", "unix://"))

    def check_visibility_timeout(self) -> None:
        """Refuse a broker timeout that would let a long task run twice: Redis' visibility
        timeout, or RabbitMQ's consumer timeout."""
        needed = self.task_deadline_s + DEADLINE_GRACE_S + self.visibility_margin_s
        if self.broker_url.startswith("amqp") and self.amqp_consumer_timeout_s <= needed:
            raise ConfigError(
                f"CAPTION_AMQP_CONSUMER_TIMEOUT_S={self.amqp_consumer_timeout_s} (RabbitMQ's "
                f"consumer_timeout) must exceed CAPTION_TASK_DEADLINE_S + {DEADLINE_GRACE_S:g}s "
                f"grace + CAPTION_VISIBILITY_MARGIN_S = {needed:g}: otherwise RabbitMQ closes "
                "the worker's channel under a running task and hands it to a second worker; "
                "raise consumer_timeout in rabbitmq.conf (and this setting) or lower the deadline"
            )
        if not self.broker_is_redis:
            return
        if self.visibility_timeout_s <= needed:
            raise ConfigError(
                f"CAPTION_VISIBILITY_TIMEOUT_S={self.visibility_timeout_s} must exceed "
                f"CAPTION_TASK_DEADLINE_S + {DEADLINE_GRACE_S:g}s grace + "
                f"CAPTION_VISIBILITY_MARGIN_S = {needed:g}: "
                "otherwise Redis hands a still-running task to a second worker"
            )


def describe_errors(exc: ValidationError) -> str:
    """Each error as ``CAPTION_NAME: message`` (a rule over several settings: ``settings:``
    and its own message, which names them)."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        name = f"{ENV_PREFIX}{field.upper()}" if field else "settings"
        parts.append(f"{name}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def load_settings() -> Settings:
    """Read the environment into a fresh Settings, or raise ConfigError naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {describe_errors(exc)}") from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read on first use (at start) and never again."""
    return load_settings()
