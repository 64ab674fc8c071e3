"""Object storage: S3 locations, the allowlist, and capped, retried reads (``s3``)."""
