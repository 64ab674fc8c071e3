"""Object storage and Redis clients: S3 locations, the allowlist, and capped, retried reads
(``s3``); redis-py clients with the worker's TLS verification (``redis_client``)."""
