"""Celery settings for the caption worker; every value comes from the environment.

Celery imports this module when the app is first configured (at worker or producer start),
so the environment is read once, through ``worker.settings``. The variables are listed in
the README; a producer does not need this module.
"""

from __future__ import annotations

import ssl
from typing import Any

from worker.settings import get_settings

_s = get_settings()

broker_url = _s.broker_url
result_backend = _s.result_backend

# The task contract: JSON only, so producers in any language can read results.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

task_default_queue = _s.queue
task_routes = {
    "caption": {"queue": _s.queue},
    # Bulk shards (docs/bulk.md); submit names the run's queue itself, this is the default.
    "caption_bulk_shard": {"queue": _s.bulk_queue or "captions-bulk"},
}

# Acknowledge after the caption is stored: a worker that dies mid-task loses nothing.
task_acks_late = True
task_reject_on_worker_lost = True
task_acks_on_failure_or_timeout = True
task_track_started = True
result_extended = True
result_expires = _s.result_expires_s

# One worker process per GPU runs many task threads; each reserves only what it runs,
# so idle messages stay in Redis where another worker (or autoscaler) can see them.
# Task events, so Flower and celery-exporter see every task without switching events on
# remotely; a listen-only monitor sees them too. Redis carries them over pub/sub (no keys).
worker_send_task_events = True
task_send_sent_event = True

worker_pool = "threads"
worker_concurrency = _s.task_threads
worker_prefetch_multiplier = 1
worker_hijack_root_logger = False
worker_cancel_long_running_tasks_on_connection_loss = False
broker_connection_retry_on_startup = True
broker_connection_max_retries = None
broker_channel_error_retry = True

_redis_transport: dict[str, Any] = {
    "visibility_timeout": _s.visibility_timeout_s,
    # Restore a dead worker's unacknowledged tasks soon after their visibility timeout.
    "unacked_restore_interval": _s.unacked_restore_interval_s,
    "unacked_restore_throttle": 1,
    "socket_timeout": 30,
    "socket_connect_timeout": 10,
    "socket_keepalive": True,
    "health_check_interval": 10,
    "retry_on_timeout": True,
    # A worker consumes its own queue, then the bulk queue (CAPTION_BULK_QUEUE): always ask
    # in that order (the default rotates), so an interactive task is taken before a shard.
    "queue_order_strategy": "priority",
}
# With RabbitMQ, a dead worker's unacknowledged messages return when its connection drops;
# none of the Redis transport's options apply.
broker_transport_options = _redis_transport if _s.broker_is_redis else {}
result_backend_transport_options = {"retry_policy": {"timeout": 30.0}}
# A Redis restart must not lose a finished caption: keep retrying the result write.
result_backend_always_retry = True
result_backend_max_retries = 30
redis_backend_health_check_interval = 10
redis_socket_timeout = 30
redis_socket_connect_timeout = 10
redis_retry_on_timeout = True

if _s.broker_url.startswith("rediss://"):
    broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": _s.redis_ca_certs}
if _s.result_backend.startswith("rediss://"):
    redis_backend_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": _s.redis_ca_certs}
