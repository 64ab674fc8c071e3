"""Errors whose class names producers see as the task's exception type.

Each class maps to one task outcome: bad input fails at once, storage trouble is retried
before it fails, and worker-level faults stop the process rather than eat tasks.
Every class takes a single message argument so Celery's JSON result backend can rebuild it
on the producer side by name, without importing this package.
"""

from __future__ import annotations


class CaptionError(Exception):
    """Base class of every error this worker reports to producers."""

    #: Whether the task is retried with backoff (``CAPTION_STORAGE_RETRIES``) before it fails.
    retryable: bool = False


class InvalidRequest(CaptionError):
    """Raised when task arguments are unknown, ill-typed or out of range."""


class ModelMismatch(CaptionError):
    """Raised when a task asks for a model other than the one this worker serves."""


class ImageNotFound(CaptionError):
    """Raised when the image object or its bucket does not exist."""


class ImageAccessDenied(CaptionError):
    """Raised when the store refuses access, or the bucket is not on the allowlist."""


class ImageTooLarge(CaptionError):
    """Raised when an image exceeds the byte cap or the decoded pixel cap."""


class InvalidImage(CaptionError):
    """Raised when the bytes are not a decodable image of an allowed format."""


class StorageUnavailable(CaptionError):
    """Raised when the object store cannot be reached or keeps failing."""

    retryable = True


class CaptionTimeout(CaptionError):
    """Raised when a task misses its deadline (queue wait excluded, model time included)."""


class TooManyDeliveries(CaptionError):
    """Raised when a task was delivered more often than allowed: it keeps killing workers."""


class CaptionFailed(CaptionError):
    """Raised when the model failed on this task for a reason not covered above."""


class ConfigError(CaptionError):
    """Raised at start when a setting is missing or invalid; the process exits."""


class ModelLoadError(CaptionError):
    """Raised at start when the model cannot be loaded; the process exits."""


class LifecycleError(CaptionError):
    """Raised when the worker is asked for a state change its lifecycle does not allow."""


#: The exception type names a producer can see on a FAILURE, documented in the README.
PRODUCER_VISIBLE = (
    InvalidRequest,
    ModelMismatch,
    ImageNotFound,
    ImageAccessDenied,
    ImageTooLarge,
    InvalidImage,
    StorageUnavailable,
    CaptionTimeout,
    TooManyDeliveries,
    CaptionFailed,
)
