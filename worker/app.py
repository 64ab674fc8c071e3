"""The deployment's entry point: ``celery -A worker.app worker`` finds ``app`` here.

The application itself lives in ``worker.queue.app``; this name stays stable for
Dockerfiles, manifests and scripts.
"""

from worker.queue.app import app

__all__ = ["app"]
