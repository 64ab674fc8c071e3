"""Checks run at once on daemon threads, each waited for until a deadline at most."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from worker.ops.doctor.report import CheckResult, Status, one_line

T = TypeVar("T")


def network_limit(timeout_s: float) -> float:
    """The longest one network check may take: a connect and a read, and thread start-up."""
    return 2 * timeout_s + 2


class Background(Generic[T]):
    """Run a function on a daemon thread; wait for it until a deadline at most.

    A daemon thread, unlike a ThreadPoolExecutor worker, never holds up the process's exit,
    so a DNS lookup or driver call that ignores its timeout cannot keep doctor running.
    """

    def __init__(self, fn: Callable[[], T]) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:
            self._error = exc

    def result(self, deadline: float) -> T:
        """The function's value; raises its exception, or TimeoutError past ``deadline``
        (a ``time.monotonic()`` value)."""
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            raise TimeoutError("no answer in time; try a larger --timeout")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


def as_list(call: Callable[[], CheckResult]) -> Callable[[], list[CheckResult]]:
    return lambda: [call()]


def collect(
    names: Sequence[str], task: Background[list[CheckResult]], deadline: float
) -> list[CheckResult]:
    """A background check's lines, or one FAIL line per name if it failed or hung."""
    try:
        return task.result(deadline)
    except Exception as exc:
        return [CheckResult(n, Status.FAIL, f"check failed: {one_line(exc)}") for n in names]
