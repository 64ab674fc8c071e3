"""Caption sidecars: each caption as a ``.txt`` object beside its image or under a mirror prefix.

The kohya/taggui convention: ``photos/cat.jpg`` gets ``photos/cat.txt`` holding the caption.
With ``--sidecars next-to-image`` the ``.txt`` goes into the image's own bucket; with
``--sidecars s3://BUCKET/PREFIX/`` it goes under that prefix at the image's key relative to
the source prefix (a manifest's images: their whole key). Each sidecar is one PutObject, which
S3 applies whole or not at all, so a reader never sees half a caption.

A sidecar that cannot be written after the storage retries turns its item's line into an
``error`` line (``StorageUnavailable``, the caption kept in ``text``), so ``bulk resume
--retry-failed`` and later runs write it again.
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from worker.bulk.errors import BucketNotAllowed
from worker.bulk.layout import OutputPrefix, parse_prefix
from worker.bulk.retries import with_retries
from worker.bulk.sources import s3_error
from worker.errors import CaptionError
from worker.storage.s3 import SCHEME, S3Location

log = logging.getLogger(__name__)

NONE = "none"
NEXT_TO_IMAGE = "next-to-image"
#: Sidecar puts in flight at once per shard.
PUT_WORKERS = 8

Line = dict[str, Any]


def sidecar_name(key: str) -> str:
    """``dir/photo.jpg`` -> ``dir/photo.txt`` (a name without an extension gains one)."""
    stem, _ = posixpath.splitext(key)
    return f"{stem or key}.txt"


@dataclass(frozen=True)
class SidecarTarget:
    """Where one run's sidecars go: ``next-to-image`` or a mirror prefix."""

    mode: str  # NEXT_TO_IMAGE, or the mirror prefix's s3:// URI
    source_prefix: str | None  # the source's key prefix ("" or ending in "/"); None: manifest

    @classmethod
    def of_run(cls, run: dict[str, Any]) -> SidecarTarget | None:
        """The run's sidecar target from run.json; None when it writes no sidecars."""
        mode = run.get("sidecars") or NONE
        if mode == NONE:
            return None
        source_prefix = None
        if run.get("source_kind") == "prefix":
            source_prefix = parse_prefix(str(run["source"]), "SOURCE")[1]
        return cls(str(mode), source_prefix)

    def location(self, image: str) -> S3Location:
        """The sidecar object of the image ``s3://bucket/key``."""
        loc = S3Location.parse(image)
        if self.mode == NEXT_TO_IMAGE:
            return S3Location(loc.bucket, sidecar_name(loc.key))
        mirror = OutputPrefix.parse(self.mode)
        key = loc.key
        if self.source_prefix is not None and key.startswith(self.source_prefix):
            key = key[len(self.source_prefix) :]
        return S3Location(mirror.bucket, mirror.prefix + sidecar_name(key))


class SidecarWriter:
    """Writes the sidecars of a shard's ``ok`` lines, a few puts at a time, retrying a
    failing store with backoff."""

    def __init__(
        self,
        client: Any,
        target: SidecarTarget,
        *,
        allowed: tuple[str, ...],
        retries: int,
        backoff_s: float,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._client = client
        self._target = target
        self._allowed = allowed
        self._retries = retries
        self._backoff_s = backoff_s
        self._sleep = sleep

    def write(self, lines: list[Line]) -> list[Line]:
        """Write the sidecar of every ``ok`` line; return the lines with those whose sidecar
        could not be written turned into ``error`` lines."""
        todo = [i for i, line in enumerate(lines) if line.get("status") == "ok"]
        if not todo:
            return lines
        out = list(lines)
        with ThreadPoolExecutor(PUT_WORKERS, thread_name_prefix="bulk-sidecar") as pool:
            failures = pool.map(self._put_one, (lines[i] for i in todo))
            for index, failure in zip(todo, failures, strict=True):
                if failure is not None:
                    out[index] = {
                        **lines[index],
                        "status": "error",
                        "error": {"type": type(failure).__name__, "message": str(failure)},
                    }
        return out

    def _put_one(self, line: Line) -> CaptionError | None:
        try:
            loc = self._target.location(str(line["image"]))
        except CaptionError as exc:
            return exc
        if self._allowed and loc.bucket not in self._allowed:
            # Submit checked this; a worker with a narrower allowlist still refuses.
            return BucketNotAllowed(
                f"sidecar {SCHEME}{loc.bucket}/{loc.key}: bucket {loc.bucket!r} is not in "
                "CAPTION_OUTPUT_BUCKETS"
            )
        body = str(line.get("text") or "").encode()

        def put() -> None:
            try:
                self._client.put_object(
                    Bucket=loc.bucket, Key=loc.key, Body=body, ContentType="text/plain"
                )
            except (ClientError, BotoCoreError) as exc:
                raise s3_error(f"writing sidecar {SCHEME}{loc.bucket}/{loc.key}", exc) from exc

        try:
            with_retries(put, retries=self._retries, backoff_s=self._backoff_s, sleep=self._sleep)
        except CaptionError as exc:
            return exc
        return None
