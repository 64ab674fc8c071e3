"""The worker process's lifecycle with a fake engine: one table of transitions, enforced.

The engine comes through ``CAPTION_ENGINE_FACTORY`` as in production, pointed at
``tests.support.fake_engine``, so no model loads and no socket opens.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import product
from pathlib import Path

import pytest

from tests.support import fake_engine
from worker.errors import CaptionFailed, ConfigError, LifecycleError, ModelLoadError
from worker.runtime.lifecycle import ALLOWED, Lifecycle, State
from worker.settings import Settings

FAKE = "tests.support.fake_engine:load_fake_engine"
FAILING = "tests.support.fake_engine:load_failing_engine"
NOT_ALLOWED = [(a, b) for a, b in product(State, State) if b not in ALLOWED[a]]


def settings(**values: object) -> Settings:
    return Settings(**{"engine_factory": FAKE, "engine": "generate", **values})  # type: ignore[arg-type]


@pytest.fixture()
def started(tmp_path: Path) -> Iterator[Lifecycle]:
    lifecycle = Lifecycle()
    lifecycle.start(settings(ready_file=str(tmp_path / "ready")), "unit/1")
    try:
        yield lifecycle
    finally:
        lifecycle.stop()


def at(state: State) -> Lifecycle:
    lifecycle = Lifecycle()
    lifecycle._state = state  # a state reached some other way; only _to is under test
    return lifecycle


def test_the_table_covers_every_state_and_stopped_is_final() -> None:
    assert set(ALLOWED) == set(State)
    assert ALLOWED[State.STOPPED] == frozenset()
    assert State.DEFUNCT in ALLOWED[State.STARTING]


@pytest.mark.parametrize(("old", "new"), NOT_ALLOWED, ids=lambda s: s.value)
def test_every_transition_off_the_table_raises_lifecycle_error(old: State, new: State) -> None:
    lifecycle = at(old)
    with pytest.raises(LifecycleError, match=f"from {old.value} to {new.value}"):
        lifecycle._to(new)
    assert lifecycle.state is old  # nothing changed


@pytest.mark.parametrize(
    ("old", "new"), [(a, b) for a in State for b in sorted(ALLOWED[a], key=lambda s: s.value)]
)
def test_every_transition_on_the_table_is_taken(old: State, new: State) -> None:
    lifecycle = at(old)
    lifecycle._to(new)
    assert lifecycle.state is new


def test_start_loads_through_the_factory_and_serves(started: Lifecycle, tmp_path: Path) -> None:
    assert started.state is State.READY
    engine = fake_engine.LOADED[-1]
    assert engine.tag_batches() == [[0]]  # the warm-up caption ran before READY
    service = started.service
    assert service.engine is engine
    assert service.worker_name == "unit/1"
    assert service.runner.is_alive()
    started.mark_consuming()
    assert (tmp_path / "ready").read_text() == "unit/1\n"


def test_stop_finishes_the_runner_and_removes_the_ready_file(tmp_path: Path) -> None:
    lifecycle = Lifecycle()
    service = lifecycle.start(settings(ready_file=str(tmp_path / "ready")), "unit/1")
    lifecycle.mark_consuming()
    lifecycle.stop()
    assert lifecycle.state is State.STOPPED
    assert not service.runner.is_alive()
    assert not (tmp_path / "ready").exists()
    lifecycle.stop()  # a second stop (signal handlers, atexit) is harmless
    assert lifecycle.state is State.STOPPED


def test_starting_twice_is_refused(started: Lifecycle) -> None:
    with pytest.raises(LifecycleError, match="from ready to starting"):
        started.start(settings(), "unit/2")
    assert started.state is State.READY


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"engine_factory": FAILING}, ModelLoadError),
        ({"engine_factory": "tests.support.fake_engine:no_such_factory"}, ConfigError),
        ({"engine_factory": "no-colon"}, ConfigError),
        ({"visibility_timeout_s": 60}, ConfigError),  # below the 600 s deadline
    ],
)
def test_a_failed_start_leaves_the_worker_defunct(
    values: dict[str, object], error: type[Exception], tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    ready.write_text("left by the process that died before this one\n")
    lifecycle = Lifecycle()
    with pytest.raises(error):
        lifecycle.start(settings(ready_file=str(ready), **values), "unit/1")
    assert lifecycle.state is State.DEFUNCT
    assert not ready.exists()  # a stale ready file never outlives a failed start
    with pytest.raises(CaptionFailed, match="not ready \\(state defunct\\)"):
        _ = lifecycle.service
    lifecycle.stop()
    assert lifecycle.state is State.STOPPED


@pytest.mark.parametrize("state", [s for s in State if s is not State.READY])
def test_service_outside_ready_fails_cleanly(state: State) -> None:
    with pytest.raises(CaptionFailed, match=f"state {state.value}"):
        _ = at(state).service


def test_service_after_stop_fails_cleanly(started: Lifecycle) -> None:
    started.stop()
    with pytest.raises(CaptionFailed, match="state stopped"):
        _ = started.service
