"""The live progress line of ``bulk status --watch`` and ``bulk submit --wait``.

``watch`` polls a run's status (a ``bulk status`` object, worker.bulk.status) until the run
is done or cancelled. On a terminal it redraws one line in place; in a log (not a tty) it
writes a full line only when the counts moved, at most one every ``5 * interval_s``, and
always the last one, so a CI log of a long run stays short. Watching never changes the run:
an interrupted watch (KeyboardInterrupt) leaves it running.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, TextIO

from worker.bulk.state import FINAL_STATES, RUNNING
from worker.errors import CaptionError

#: A log (not a tty) gets at most one line per this many poll intervals.
LOG_EVERY_INTERVALS = 5
#: ANSI "erase to end of line": a shorter redraw leaves no tail of the previous one.
CLEAR_TO_END = "\x1b[K"
MAX_MESSAGE_CHARS = 120

Status = dict[str, Any]


def _count(status: Status, name: str) -> int:
    return int(status.get(name) or 0)


def progress_of(status: Status) -> tuple[int, int]:
    """(items finished, items to caption): finished is succeeded + failed; the whole is
    ``to_caption`` when the status has it, else finished + remaining."""
    done = _count(status, "succeeded") + _count(status, "failed")
    whole = status.get("to_caption")
    return done, int(whole) if whole is not None else done + _count(status, "remaining")


def format_eta(seconds: float | None) -> str:
    """``H:MM:SS`` (hours grow past 9 as needed), ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = math.ceil(seconds)  # never promise an end sooner than the estimate
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _bar(fraction: float, width: int) -> str:
    filled = min(int(fraction * width), width)
    return "#" * filled + "-" * (width - filled)


def render(status: Status, width: int = 30) -> str:
    """One progress line, e.g. ``RUN [######------]  1,234/2,000  61.7%  28.3 img/s
    ETA 0:00:27  failed 3``; ``failed`` only when some failed, the state when not running."""
    done, whole = progress_of(status)
    # Nothing to caption is complete; percentages round down so 100% means finished.
    fraction = min(done / whole, 1.0) if whole > 0 else 1.0
    percent = math.floor(fraction * 1000) / 10
    rate = status.get("images_per_second")
    parts = [
        f"{status.get('run_id', '?')} [{_bar(fraction, width)}]",
        f"{done:,}/{whole:,}",
        f"{percent:.1f}%",
        "- img/s" if rate is None else f"{float(rate):.1f} img/s",
        f"ETA {format_eta(status.get('eta_seconds'))}",
    ]
    if _count(status, "failed"):
        parts.append(f"failed {_count(status, 'failed'):,}")
    state = status.get("state")
    if state != RUNNING:
        parts.append(str(state))
    return "  ".join(parts)


def _numbers(status: Status) -> tuple[Any, ...]:
    """What a log line is written for: the counts and the state, not rate or ETA (they
    move on every poll and would defeat the point of writing only on change)."""
    names = ("succeeded", "failed", "skipped", "remaining", "to_caption", "state")
    return tuple(status.get(name) for name in names)


class _TtyView:
    """A terminal: one line redrawn in place, ended with a newline when watching ends."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.drawn = False

    def show(self, status: Status, line: str, final: bool) -> None:
        self.stream.write(f"\r{line}{CLEAR_TO_END}")
        self.stream.flush()
        self.drawn = True

    def note(self, message: str) -> None:
        # Replace the progress line with the note; the next redraw starts a new line.
        self.stream.write(f"\r{message}{CLEAR_TO_END}\n")
        self.stream.flush()
        self.drawn = False

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


class _LogView:
    """A log or pipe: full lines, only when the numbers changed and not too often."""

    def __init__(self, stream: TextIO, min_gap_s: float, clock: Callable[[], float]) -> None:
        self.stream = stream
        self.min_gap_s = min_gap_s
        self.clock = clock
        self.last_numbers: tuple[Any, ...] | None = None
        self.last_line: str | None = None
        self.last_at: float | None = None

    def _due(self, status: Status) -> bool:
        if _numbers(status) == self.last_numbers:
            return False
        return self.last_at is None or self.clock() - self.last_at >= self.min_gap_s

    def show(self, status: Status, line: str, final: bool) -> None:
        if (final and line != self.last_line) or self._due(status):
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last_numbers, self.last_line, self.last_at = _numbers(status), line, self.clock()

    def note(self, message: str) -> None:
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Every line is already complete."""


def _describe(exc: Exception) -> str:
    # A CaptionError's message is written to be shown (no credentials, no endpoint user
    # info); any other exception may carry a URL, so only its type is shown.
    if isinstance(exc, CaptionError):
        text = " ".join(str(exc).split())[:MAX_MESSAGE_CHARS]
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return type(exc).__name__


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def watch(
    poll: Callable[[], Status],
    stream: TextIO,
    *,
    interval_s: float = 2.0,
    tty: bool | None = None,
    sleep: Callable[[float], object] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    width: int = 30,
    max_failures: int = 30,
) -> Status:
    """Poll ``poll()`` every ``interval_s`` and draw its progress on ``stream`` until the
    run's state is terminal (done, cancelled); return that last status.

    ``tty`` (default: ``stream.isatty()``) chooses the in-place line or the short log. A
    failing poll is written once per streak of failures and tried again after
    ``interval_s``; the ``max_failures``-th failure in a row is raised. KeyboardInterrupt is
    never caught: the caller stops watching and the run goes on.
    """
    on_tty = _is_tty(stream) if tty is None else tty
    view = _TtyView(stream) if on_tty else _LogView(stream, interval_s * LOG_EVERY_INTERVALS, clock)
    failures = 0
    try:
        while True:
            try:
                status = poll()
            except Exception as exc:
                failures += 1
                if failures >= max_failures:
                    raise
                if failures == 1:  # one line per outage, not one per retry
                    view.note(f"status unavailable ({_describe(exc)}); retrying")
                sleep(interval_s)
                continue
            failures = 0
            final = status.get("state") in FINAL_STATES
            view.show(status, render(status, width), final)
            if final:
                return status
            sleep(interval_s)
    finally:
        view.close()  # a tty's line ends with a newline however watching ends
