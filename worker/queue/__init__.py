"""Everything that knows about Celery and Redis: the app, the task, crash accounting, keys."""
