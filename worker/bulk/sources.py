"""A run's source as a stream of items: an S3 prefix listing, or a manifest of images.

Nothing here holds a whole source: a prefix is read page by page from ``list_objects_v2``,
and a manifest line by line from a local file (an ``s3://`` manifest is first copied to a
temporary file, streamed). Planning 10 million keys therefore needs the memory of one page.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from worker.bulk.errors import BulkError, ManifestError, SourceNotFound
from worker.bulk.layout import OutputPrefix
from worker.errors import CaptionError, ImageAccessDenied, InvalidRequest, StorageUnavailable
from worker.storage.s3 import SCHEME, S3Location

#: The extensions of the formats the worker decodes (worker.images.ALLOWED_FORMATS:
#: JPEG, PNG, WebP, GIF, BMP, TIFF); matched without regard to case.
DEFAULT_INCLUDE: tuple[str, ...] = (
    "*.jpg", "*.jpeg", "*.png", "*.webp", "*.gif", "*.bmp", "*.tif", "*.tiff",
)  # fmt: skip
MANIFEST_SUFFIXES = (".txt", ".jsonl")
#: Keys of a jsonl manifest line; anything else is refused, like unknown task arguments.
MANIFEST_FIELDS = frozenset({"image", "id", "prompt", "max_new_tokens"})
#: Concurrent HeadObject requests for manifest items.
HEAD_WORKERS = 16
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_HINTS = {
    "NoCredentialsError": "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a boto3 profile",
    "EndpointConnectionError": "check AWS_ENDPOINT_URL_S3 and the network",
    "ConnectTimeoutError": "check AWS_ENDPOINT_URL_S3 and the network",
}


@dataclass(frozen=True, slots=True)
class Item:
    """One image to caption; ``to_json`` is its line in ``inputs/NNNNN.jsonl``."""

    id: str
    image: str  # s3://bucket/key
    etag: str | None  # without quotes; None when the object did not exist at planning
    size: int | None
    prompt: str | None = None  # a manifest line's own prompt, else the run's
    max_new_tokens: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "image": self.image,
            "etag": self.etag,
            "size": self.size,
        }
        if self.prompt is not None:
            out["prompt"] = self.prompt
        if self.max_new_tokens is not None:
            out["max_new_tokens"] = self.max_new_tokens
        return out


class KeyFilter:
    """``--include`` / ``--exclude`` globs over a key relative to the source prefix.

    fnmatch semantics (``*`` also crosses ``/``, so ``*.jpg`` matches ``a/b/c.jpg``), but
    case-insensitive on every platform: ``IMG_0001.JPG`` is a JPEG too.
    """

    def __init__(self, include: Iterable[str], exclude: Iterable[str] = ()) -> None:
        self.include = tuple(include)
        self.exclude = tuple(exclude)
        self._include = _compile(self.include)
        self._exclude = _compile(self.exclude)

    def __call__(self, relative_key: str) -> bool:
        if self._include is None or not self._include.match(relative_key):
            return False
        return self._exclude is None or not self._exclude.match(relative_key)


def _compile(globs: tuple[str, ...]) -> re.Pattern[str] | None:
    if not globs:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs), re.IGNORECASE)


def is_manifest(source: str) -> bool:
    """Whether ``source`` names a manifest (``.txt`` or ``.jsonl``) rather than a prefix."""
    return source.lower().endswith(MANIFEST_SUFFIXES)


def strip_etag(etag: str | None) -> str | None:
    """S3 sends ETags quoted; items carry them bare."""
    return etag.strip('"') if etag else None


def s3_error(what: str, exc: Exception) -> CaptionError:
    """A typed error for a failed listing or read, without botocore's text or credentials."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = str(error.get("Code") or status or "unknown")
        if code == "NoSuchBucket":
            return SourceNotFound(f"{what}: the bucket does not exist ({code})")
        if code in NOT_FOUND_CODES or status == 404:
            return SourceNotFound(f"{what} does not exist ({code})")
        if code in {"AccessDenied", "403", "Forbidden"} or status == 403:
            return ImageAccessDenied(
                f"{what}: access denied by the store ({code}); check the bucket policy and "
                "the credentials this command runs with"
            )
        return StorageUnavailable(f"{what}: the store answered {code} (HTTP {status})")
    name = type(exc).__name__
    return StorageUnavailable(f"{what}: {name} from the store; {_HINTS.get(name, 'retry later')}")


def list_prefix(
    client: Any,
    bucket: str,
    prefix: str,
    key_filter: KeyFilter,
    *,
    page_size: int = 1_000,
    runs: OutputPrefix | None = None,
) -> Iterator[Item]:
    """Every object under ``prefix`` that the filter takes, in key order, one page at a time.

    An item's id is its key relative to the prefix. Folder markers (keys ending in ``/``)
    are left out, and so are the files of bulk runs when ``runs`` (the ``--out`` prefix)
    lies under the source: a run must never caption its own outputs.
    """
    paginator = client.get_paginator("list_objects_v2")
    pages = paginator.paginate(
        Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
    )
    own_runs = runs if runs is not None and runs.bucket == bucket else None
    where = f"listing {SCHEME}{bucket}/{prefix}"
    try:
        for page in pages:
            for obj in page.get("Contents", ()):
                key = obj["Key"]
                relative = key[len(prefix) :]
                if not relative or key.endswith("/") or not key_filter(relative):
                    continue
                if own_runs is not None and own_runs.run_id_of(key) is not None:
                    continue
                yield Item(
                    id=relative,
                    image=f"{SCHEME}{bucket}/{key}",
                    etag=strip_etag(obj.get("ETag")),
                    size=obj.get("Size"),
                )
    except (ClientError, BotoCoreError) as exc:
        raise s3_error(where, exc) from exc


# --- Manifests ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One parsed manifest line, before its object is looked up."""

    line: int  # 1-based
    id: str
    location: S3Location
    prompt: str | None = None
    max_new_tokens: int | None = None


def fetch_manifest(client: Any, source: str, directory: Path) -> Path:
    """A local file with the manifest's text: the path itself, or an ``s3://`` manifest
    copied into ``directory`` chunk by chunk (it is read twice, and may be large)."""
    if not source.startswith(SCHEME):
        path = Path(source)
        if not path.is_file():
            raise SourceNotFound(f"manifest {source!r} is not a readable file")
        return path
    try:
        loc = S3Location.parse(source)
    except InvalidRequest as exc:
        raise ManifestError(f"manifest: {exc}") from None
    local = directory / ("manifest" + Path(loc.key).suffix.lower())
    try:
        body = client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
        with local.open("wb") as out:
            shutil.copyfileobj(body, out, 1024 * 1024)
    except (ClientError, BotoCoreError) as exc:
        raise s3_error(f"manifest {loc}", exc) from exc
    return local


def read_manifest(
    path: Path, kind: str, check: Callable[[ManifestEntry], None] | None = None
) -> Iterator[ManifestEntry]:
    """Parse a ``.txt`` (one ``s3://`` URI a line) or ``.jsonl`` (objects with ``image`` and
    optional ``id``, ``prompt``, ``max_new_tokens``) manifest, one line at a time.

    Blank lines and lines starting with ``#`` are ignored in both. An item's id is the
    jsonl ``id`` or else its 1-based line number. ``check`` validates each entry further
    (the plan checks prompts, limits and allowlists there). Raises ManifestError naming the
    line for anything it cannot use.
    """
    with path.open(encoding="utf-8", newline=None) as lines:
        number = 0
        try:
            for number, raw in enumerate(lines, start=1):
                text = raw.strip()
                if not text or text.startswith("#"):
                    continue
                entry = _parse_line(number, text, kind)
                if check is not None:
                    check(entry)
                yield entry
        except UnicodeDecodeError:
            raise ManifestError(
                f"manifest line {number + 1}: not UTF-8 text; manifests are UTF-8"
            ) from None
        except CaptionError as exc:
            if isinstance(exc, BulkError):
                raise
            raise ManifestError(f"manifest line {number}: {exc}") from None


def _parse_line(number: int, text: str, kind: str) -> ManifestEntry:
    if kind == ".txt":
        return ManifestEntry(number, str(number), S3Location.parse(text))
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise ManifestError(f"manifest line {number}: not a JSON object ({exc})") from None
    if not isinstance(obj, dict):
        raise ManifestError(f"manifest line {number}: not a JSON object")
    unknown = sorted(set(obj) - MANIFEST_FIELDS)
    if unknown:
        raise ManifestError(
            f"manifest line {number}: unknown field(s) {', '.join(map(repr, unknown))}; "
            f"a line has {', '.join(sorted(MANIFEST_FIELDS))}"
        )
    if "image" not in obj:
        raise ManifestError(f"manifest line {number}: no 'image' (s3://bucket/key)")
    item_id = obj.get("id")
    if item_id is None:
        item_id = str(number)
    elif not isinstance(item_id, str) or not item_id:
        raise ManifestError(f"manifest line {number}: 'id' must be a non-empty string")
    prompt = obj.get("prompt")
    tokens = obj.get("max_new_tokens")
    if prompt is not None and not isinstance(prompt, str):
        raise ManifestError(f"manifest line {number}: 'prompt' must be a string")
    if tokens is not None and (type(tokens) is not int):
        raise ManifestError(f"manifest line {number}: 'max_new_tokens' must be an integer")
    return ManifestEntry(number, item_id, S3Location.parse(obj["image"]), prompt, tokens)


def head_items(
    client: Any, entries: Iterable[ManifestEntry], workers: int = HEAD_WORKERS
) -> Iterator[Item]:
    """Items for manifest entries, in manifest order, with ETag and size from HeadObject.

    Up to ``workers`` requests run at once and at most ``4 * workers`` results wait to be
    yielded, so memory stays bounded however long the manifest. An object that does not
    exist is not an error here: it is planned with etag and size null, and its caption
    fails with ImageNotFound when the run reaches it. Any other failure (denied, the store
    down) stops planning, since it would fail every item alike.
    """

    def head(entry: ManifestEntry) -> Item:
        loc = entry.location
        try:
            meta = client.head_object(Bucket=loc.bucket, Key=loc.key)
            etag, size = strip_etag(meta.get("ETag")), meta.get("ContentLength")
        except ClientError as exc:
            error = s3_error(f"manifest line {entry.line}: {loc}", exc)
            if not isinstance(error, SourceNotFound):
                raise error from exc
            etag, size = None, None
        except BotoCoreError as exc:
            raise s3_error(f"manifest line {entry.line}: {loc}", exc) from exc
        return Item(entry.id, str(loc), etag, size, entry.prompt, entry.max_new_tokens)

    window: deque[Future[Item]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="bulk-head") as pool:
        try:
            for entry in entries:
                window.append(pool.submit(head, entry))
                if len(window) >= 4 * workers:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for future in window:
                future.cancel()
