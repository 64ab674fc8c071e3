"""Where a bulk run lives in S3: every key name of a run, in one place (like worker.queue.keys).

A run is a directory ``s3://BUCKET/PREFIX/RUN_ID/`` under the ``--out`` prefix::

    run.json                       the plan; written LAST by submit, so its presence means
                                   the inputs are complete (a directory without it is an
                                   abandoned plan and nothing reads it)
    inputs/00000.jsonl             items to caption, one JSON object a line, SHARD_SIZE a file
    skipped/00000.jsonl            items an earlier run already captioned: output lines with
                                   status "skipped", written by submit
    shards/00000.checkpoint.jsonl  a worker's output so far for a shard (rewritten every K items)
    shards/00000.output.jsonl      a finished shard's output lines, written once by a worker
    manifest.json                  written when the run ends

Shard numbers are zero-based and always five digits, so keys sort in shard order.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from worker.bulk.errors import InvalidBulkOption
from worker.errors import InvalidRequest
from worker.storage.s3 import SCHEME, S3Location

RUN_FILE = "run.json"
MANIFEST_FILE = "manifest.json"
INPUT_KEY = "inputs/{shard:05d}.jsonl"
SKIPPED_KEY = "skipped/{shard:05d}.jsonl"
CHECKPOINT_KEY = "shards/{shard:05d}.checkpoint.jsonl"
OUTPUT_KEY = "shards/{shard:05d}.output.jsonl"
OUTPUTS_DIR = "shards/"
#: Five digits: past this a shard number would no longer sort as text.
MAX_SHARDS = 100_000

RUN_ID_RE = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")
OUTPUT_NAME_RE = re.compile(r"\d{5}\.output\.jsonl")


def new_run_id(now: datetime | None = None) -> str:
    """``YYYYMMDD-HHMMSS-xxxxxx``: UTC time (runs sort by start) and 6 random hex digits
    (two submits in the same second never collide in practice)."""
    now = now or datetime.now(UTC)
    return f"{now.astimezone(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def parse_prefix(uri: str, what: str) -> tuple[str, str]:
    """Split ``s3://bucket[/prefix]`` into the bucket and a prefix that is empty or ends in
    ``/``: a prefix names a folder, so ``s3://b/photos`` never matches ``photos2/``."""
    if not isinstance(uri, str) or not uri.startswith(SCHEME):
        raise InvalidBulkOption(
            f"{what} {uri!r:.120} must be an S3 prefix like s3://bucket/prefix/"
        )
    bucket, _, prefix = uri[len(SCHEME) :].partition("/")
    if not prefix.strip("/"):
        prefix = ""  # s3://bucket and s3://bucket/ both name the whole bucket
    try:
        # S3Location checks the bucket name and the key's length; it needs a non-empty key,
        # so an empty prefix is checked with a one-character stand-in.
        S3Location.parse(f"{SCHEME}{bucket}/{prefix or '_'}")
    except InvalidRequest as exc:
        raise InvalidBulkOption(f"{what}: {exc}") from None
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


@dataclass(frozen=True)
class OutputPrefix:
    """The ``--out`` prefix: every run of it is a directory directly beneath."""

    bucket: str
    prefix: str  # "" or ending in "/"

    @classmethod
    def parse(cls, uri: str) -> OutputPrefix:
        """Parse ``s3://bucket[/prefix]``; raise InvalidBulkOption for anything else."""
        return cls(*parse_prefix(uri, "--out"))

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}"

    def run(self, run_id: str) -> RunLayout:
        """The layout of one run under this prefix."""
        return RunLayout(self.bucket, f"{self.prefix}{run_id}/", run_id)

    def run_id_of(self, key: str) -> str | None:
        """The run id when ``key`` lies inside a run directory of this prefix, else None
        (so a source listing can leave out the runs' own files)."""
        if not key.startswith(self.prefix):
            return None
        first, slash, _ = key[len(self.prefix) :].partition("/")
        return first if slash and RUN_ID_RE.fullmatch(first) else None


@dataclass(frozen=True)
class RunLayout:
    """The S3 keys of one run's files."""

    bucket: str
    root: str  # the run directory's key prefix, ending in "/"
    run_id: str

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.root}"

    @property
    def run_json(self) -> str:
        return self.root + RUN_FILE

    @property
    def manifest(self) -> str:
        return self.root + MANIFEST_FILE

    @property
    def outputs_dir(self) -> str:
        return self.root + OUTPUTS_DIR

    def input(self, shard: int) -> str:
        return self.root + INPUT_KEY.format(shard=shard)

    def skipped(self, shard: int) -> str:
        return self.root + SKIPPED_KEY.format(shard=shard)

    def checkpoint(self, shard: int) -> str:
        return self.root + CHECKPOINT_KEY.format(shard=shard)

    def output(self, shard: int) -> str:
        return self.root + OUTPUT_KEY.format(shard=shard)

    def is_output(self, key: str) -> bool:
        """Whether ``key`` is a finished shard's output file of this run."""
        return key.startswith(self.outputs_dir) and bool(
            OUTPUT_NAME_RE.fullmatch(key[len(self.outputs_dir) :])
        )
