"""Typed failures of bulk planning, in the worker's CaptionError hierarchy.

They are never seen by producers of ``caption`` tasks (so they are not in
``worker.errors.PRODUCER_VISIBLE``); the CLI turns each into one line and exit code 2,
because every one of them is fixed by changing the command or its input, not by retrying.
"""

from __future__ import annotations

from worker.errors import CaptionError


class BulkError(CaptionError):
    """Base class of every error that stops a bulk submit before or while it plans."""


class InvalidBulkOption(BulkError):
    """Raised when a bulk submit option is malformed or out of range."""


class BucketNotAllowed(BulkError):
    """Raised when a run would read a bucket outside CAPTION_ALLOWED_BUCKETS or write one
    outside CAPTION_OUTPUT_BUCKETS; raised before anything is written."""


class SourceNotFound(BulkError):
    """Raised when the source prefix's bucket or the manifest does not exist."""


class ManifestError(BulkError):
    """Raised when a manifest line cannot be read as an item; the message names the line."""


class DuplicateItemId(ManifestError):
    """Raised when two manifest lines give the same item id; ids must be unique in a run."""
