"""The progress line of ``bulk status --watch`` / ``bulk submit --wait`` (worker.bulk.progress),
with a fake clock and sleep: nothing here waits."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from worker.bulk.errors import SourceNotFound
from worker.bulk.progress import CLEAR_TO_END, format_eta, render, watch
from worker.errors import StorageUnavailable

RUN_ID = "20261130-101500-abc123"
#: What a fake poll answers: a status, or an exception it raises.
Answer = dict[str, Any] | Exception


def status(done: int, of: int = 2_000, failed: int = 0, **more: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "run_id": RUN_ID, "state": "running", "total": of + 10, "succeeded": done - failed,
        "failed": failed, "skipped": 10, "remaining": of - done, "images_per_second": 28.3,
        "eta_seconds": 27.0,
    }  # fmt: skip
    return {**fields, **more}


class FakeTime:
    """A monotonic clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def poller(answers: Iterable[Answer]) -> Callable[[], dict[str, Any]]:
    queue = list(answers)

    def poll() -> dict[str, Any]:
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return poll


def run_watch(
    answers: Iterable[Answer], *, tty: bool, **options: Any
) -> tuple[dict[str, Any], str, FakeTime]:
    fake, out = FakeTime(), io.StringIO()
    last = watch(poller(answers), out, tty=tty, sleep=fake.sleep, clock=fake.clock, **options)
    return last, out.getvalue(), fake


def test_render_shows_bar_counts_rate_eta_and_failures() -> None:
    line = render(status(1_234, failed=3), width=20)
    assert line == (
        f"{RUN_ID} [############--------]  1,234/2,000  61.7%  28.3 img/s  ETA 0:00:27  failed 3"
    )
    # No failures, no "failed"; to_caption, when given, is the whole.
    assert "failed" not in render(status(10))
    assert "10/50" in render({**status(10), "to_caption": 50})


def test_render_without_rate_or_eta_and_at_the_end() -> None:
    line = render(status(0, images_per_second=None, eta_seconds=None), width=10)
    assert line == f"{RUN_ID} [----------]  0/2,000  0.0%  - img/s  ETA ?"
    # Percentages round down: 1,999 of 2,000 is not yet 100%.
    assert "99.9%" in render(status(1_999))
    done = render(status(2_000, state="done", eta_seconds=0.0), width=4)
    assert done.startswith(f"{RUN_ID} [####]  2,000/2,000  100.0%") and done.endswith("  done")
    # A run with nothing to caption is complete, not a division by zero.
    assert "[####]  0/0  100.0%" in render(status(0, of=0, state="done"), width=4)


def test_eta_is_hours_minutes_seconds() -> None:
    assert [format_eta(s) for s in (0.0, 26.2, 3_600, 40 * 3_600 + 61)] == [
        "0:00:00", "0:00:27", "1:00:00", "40:01:01",
    ]  # fmt: skip
    assert format_eta(None) == format_eta(float("inf")) == "?"


def test_a_tty_redraws_in_place_and_ends_with_a_newline() -> None:
    answers = [status(0), status(500), status(1_500), status(2_000, state="done")]
    last, text, fake = run_watch(answers, tty=True, interval_s=2.0)
    assert last["state"] == "done"
    assert text.count("\r") == 4 and text.count(CLEAR_TO_END) == 4
    assert text.endswith("done" + CLEAR_TO_END + "\n") and text.count("\n") == 1
    assert fake.sleeps == [2.0, 2.0, 2.0]  # no sleep after the final poll


def test_a_log_gets_few_lines_and_always_the_last() -> None:
    # 60 polls 1 s apart, the counts moving on every one: at most one line per 5 s.
    answers = [status(done) for done in range(0, 1_800, 30)] + [status(2_000, state="done")]
    last, text, _ = run_watch(answers, tty=False, interval_s=1.0)
    lines = text.splitlines()
    assert "\r" not in text and last["state"] == "done"
    assert 10 <= len(lines) <= 13
    assert lines[0].startswith(f"{RUN_ID} [") and lines[-1].endswith("  done")


def test_a_log_writes_nothing_while_the_counts_stand_still() -> None:
    # Rate and ETA change on every poll; the counts do not: only the first and last lines.
    answers = [status(100, eta_seconds=float(n)) for n in range(30)]
    answers.append(status(2_000, state="cancelled"))
    last, text, _ = run_watch(answers, tty=False, interval_s=1.0)
    assert last["state"] == "cancelled"
    assert len(text.splitlines()) == 2


def test_watching_stops_at_cancelled() -> None:
    cancelled = status(700, state="cancelled")
    last, text, fake = run_watch([status(600), cancelled, status(800)], tty=True)
    assert last is cancelled and len(fake.sleeps) == 1
    assert text.rstrip("\n").endswith("cancelled" + CLEAR_TO_END)


def test_transient_poll_failures_are_written_once_and_retried() -> None:
    outage: list[Exception] = [StorageUnavailable("store answered 503"), ConnectionError("x@y")]
    answers: list[Answer] = [status(10), *outage * 3, status(20), status(2_000, state="done")]
    last, text, fake = run_watch(answers, tty=False, interval_s=1.0)
    assert last["state"] == "done"
    notes = [line for line in text.splitlines() if "unavailable" in line]
    assert notes == ["status unavailable (StorageUnavailable: store answered 503); retrying"]
    assert len(fake.sleeps) == 8  # after each poll but the last
    # Only a CaptionError's message is shown; others may carry a URL, so only their type.
    _, text, _ = run_watch([ConnectionError("user:pw@host"), status(0, state="done")], tty=True)
    assert "status unavailable (ConnectionError); retrying" in text and "pw" not in text


def test_a_lasting_failure_is_raised_after_max_failures_in_a_row() -> None:
    failures: list[Exception] = [SourceNotFound(f"gone {n}") for n in range(5)]
    # Streaks shorter than max_failures are tolerated; a success resets the count.
    answers: list[Answer] = [*failures[:2], status(1), *failures[:2], status(2_000, state="done")]
    assert run_watch(answers, tty=False, max_failures=3)[0]["state"] == "done"
    fake, out = FakeTime(), io.StringIO()
    with pytest.raises(SourceNotFound, match="gone 2"):
        watch(
            poller([status(1), *failures]), out, tty=True, max_failures=3,
            sleep=fake.sleep, clock=fake.clock,
        )  # fmt: skip
    assert out.getvalue().endswith("\n")  # the tty line is ended before the error shows


def test_keyboard_interrupt_propagates_and_ends_the_line() -> None:
    answers: list[dict[str, Any] | BaseException] = [status(1)]

    def poll() -> dict[str, Any]:
        if not answers:
            raise KeyboardInterrupt
        answer = answers.pop(0)
        assert isinstance(answer, dict)
        return answer

    fake, out = FakeTime(), io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        watch(poll, out, tty=True, sleep=fake.sleep, clock=fake.clock)
    assert out.getvalue().endswith(CLEAR_TO_END + "\n")


def test_a_stream_without_a_tty_is_a_log() -> None:
    out = io.StringIO()  # isatty() is False
    fake = FakeTime()
    watch(poller([status(2_000, state="done")]), out, sleep=fake.sleep, clock=fake.clock)
    assert out.getvalue() == render(status(2_000, state="done")) + "\n"
