"""Doctor's report: a status word per check, its one-line message, and how it is printed.

Also the small formatters the checks share, so every message states sizes, durations,
errors and URLs the same way (a URL never with its password).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from urllib.parse import urlsplit

GIB = 2**30


class Status(StrEnum):
    """How a check came out. Only FAIL makes ``caption-worker doctor`` exit non-zero."""

    OK = "OK"
    WARN = "WARN"  # the worker starts, but something will hurt (speed, visibility, memory)
    FAIL = "FAIL"  # the worker will not start, or will not serve
    SKIP = "SKIP"  # the check does not apply to this configuration or host


@dataclass(frozen=True)
class CheckResult:
    """One line of the report: ``check`` is a stable name, ``message`` one sentence."""

    check: str
    status: Status
    message: str


def gib(n_bytes: float) -> str:
    """Bytes in GiB, to one decimal."""
    return f"{n_bytes / GIB:.1f} GiB"


def human_size(n_bytes: float) -> str:
    """Bytes in GiB, or MiB below one GiB (test models are a few MiB)."""
    return gib(n_bytes) if n_bytes >= GIB else f"{n_bytes / 2**20:.1f} MiB"


def human_duration(seconds: float) -> str:
    """Seconds as days or hours when they are whole, else as seconds."""
    if seconds >= 86_400 and seconds % 3_600 == 0:
        return f"{seconds / 86_400:g} days" if seconds != 86_400 else "1 day"
    if seconds >= 3_600 and seconds % 60 == 0:
        return f"{seconds / 3_600:g} h"
    return f"{seconds:g} s"


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line: its first line of text, or its type's name."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def safe_url(url: str) -> str:
    """A URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:**@{host}").geturl()


def format_text(results: Sequence[CheckResult]) -> str:
    """One aligned line per check: status word, check name, message."""
    width = max((len(r.check) for r in results), default=0)
    return "\n".join(f"{r.status.value:<4}  {r.check:<{width}}  {r.message}" for r in results)


def format_json(results: Sequence[CheckResult]) -> str:
    """A JSON list of ``{check, status, message}`` objects."""
    return json.dumps([{**asdict(r), "status": r.status.value} for r in results], indent=2)


def exit_code(results: Sequence[CheckResult]) -> int:
    """0 when no check failed, 1 otherwise."""
    return int(any(r.status is Status.FAIL for r in results))
