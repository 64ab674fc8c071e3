"""The slot runner's scheduling with a fake slot engine: admission, OOM back-off, suspects."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, cast

import pytest

from tests.support.batching import RecordingGuard, settle
from worker.batching.slot_runner import SlotRunner
from worker.contract import GenerationOptions
from worker.engine.base import CaptionOutput, FinishReason, PreparedInput
from worker.engine.slot_engine import SlotEngine
from worker.errors import CaptionFailed


class FakeOOM(Exception):
    """Stands in for torch.OutOfMemoryError."""


SUSPECT_TAG = 9
BROKEN_TAG = 13


def row(tag: int, tokens: int = 3, prompt: int = 10) -> PreparedInput:
    return PreparedInput({"tag": tag}, prompt, (32, 32), tokens, GenerationOptions())


class FakeSlots:
    """Rows finish after ``max_new_tokens`` steps; a prefill of more than ``oom_above`` rows
    raises FakeOOM, as a device would."""

    def __init__(self, slots: int, oom_above: int = 0, capacity: int = 100) -> None:
        self.slots = slots
        self.capacity = capacity
        self.oom_above = oom_above
        self.rows: dict[int, tuple[PreparedInput, int, int]] = {}  # slot -> (item, done, peak)
        self.prefills: list[int] = []
        self.admitted: list[int] = []  # tags, in the order rows got a slot or ran alone
        self.live_at_admit: dict[int, int] = {}  # tag -> rows already live when it joined
        self.peak_live = 0
        self.live_beside_suspect: set[int] = set()

    @property
    def oom_errors(self) -> tuple[type[BaseException], ...]:
        return (FakeOOM,)

    def release_memory(self) -> None:
        pass

    @property
    def live(self) -> int:
        return len(self.rows)

    def free_slots(self) -> list[int]:
        return [s for s in range(self.slots) if s not in self.rows]

    def fits(self, item: PreparedInput) -> bool:
        return item.prompt_tokens + item.max_new_tokens <= self.capacity

    def run_alone(self, item: PreparedInput, deadline: float | None) -> CaptionOutput:
        if item.tensors["tag"] == BROKEN_TAG:
            raise ValueError("this input breaks the model")
        self.admitted.append(item.tensors["tag"])
        self.live_at_admit[item.tensors["tag"]] = self.live
        return self._out(item, item.max_new_tokens, "length", 1)

    def admit_many(self, rows: list[tuple[int, PreparedInput]]) -> list[CaptionOutput | None]:
        if any(item.tensors["tag"] == BROKEN_TAG for _, item in rows):
            raise ValueError("this input breaks the model")
        if self.oom_above and len(rows) > self.oom_above:
            raise FakeOOM(f"{len(rows)} rows")
        self.prefills.append(len(rows))
        for _, item in rows:
            self.admitted.append(item.tensors["tag"])
            self.live_at_admit[item.tensors["tag"]] = self.live
        for slot, item in rows:
            self.rows[slot] = (item, 1, 0)
        self.peak_live = max(self.peak_live, self.live)
        return [None] * len(rows)

    def step(self) -> list[tuple[int, CaptionOutput]]:
        time.sleep(0.002)
        if any(item.tensors["tag"] == SUSPECT_TAG for item, _, _ in self.rows.values()):
            self.live_beside_suspect.add(self.live)
        finished = []
        for slot, (item, done, _) in list(self.rows.items()):
            if done + 1 >= item.max_new_tokens:
                del self.rows[slot]
                finished.append((slot, self._out(item, item.max_new_tokens, "length", 1)))
            else:
                self.rows[slot] = (item, done + 1, 0)
        return finished

    def stop_row(self, slot: int, reason: FinishReason) -> CaptionOutput:
        item, done, _ = self.rows.pop(slot)
        return self._out(item, done, reason, 1)

    @staticmethod
    def _out(item: PreparedInput, tokens: int, why: FinishReason, n: int) -> CaptionOutput:
        return CaptionOutput(f"row {item.tensors['tag']}", item.prompt_tokens, tokens, why, 0.0, n)


@pytest.fixture()
def make_runner() -> Iterator[Any]:
    runners: list[SlotRunner] = []

    def make(engine: FakeSlots, **hooks: Any) -> SlotRunner:
        runner = SlotRunner(cast(SlotEngine, engine), **hooks)
        runner.start()
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        runner.stop(timeout=5)


def test_more_rows_than_slots_all_finish_and_never_exceed_the_slots(make_runner: Any) -> None:
    engine = FakeSlots(slots=3)
    runner = make_runner(engine)
    far = time.monotonic() + 30
    futures = [runner.submit(row(i, tokens=2 + i % 5), far) for i in range(10)]
    outputs = settle(runner, futures, timeout=10)
    assert [o.text for o in outputs] == [f"row {i}" for i in range(10)]
    assert engine.peak_live == 3


def test_out_of_memory_in_prefill_halves_the_prefill_and_loses_no_row(make_runner: Any) -> None:
    engine = FakeSlots(slots=8, oom_above=2)
    runner = make_runner(engine)
    far = time.monotonic() + 30
    with runner._cond:  # all eight arrive before the model thread looks
        futures = [runner.submit(row(i), far) for i in range(8)]
    outputs = settle(runner, futures, timeout=10)
    assert all(isinstance(o, CaptionOutput) for o in outputs), outputs
    assert max(engine.prefills) <= 2
    assert runner.prefill_cap <= 2


def test_a_row_out_of_memory_even_alone_fails_and_the_rest_go_on(make_runner: Any) -> None:
    engine = FakeSlots(slots=2)
    runner = make_runner(engine)
    engine.oom_above = -1  # every prefill fails: 0 rows is not "more than -1"
    failing = runner.submit(row(0), time.monotonic() + 30)
    got = settle(runner, [failing], timeout=10)[0]
    assert isinstance(got, CaptionFailed) and "out of memory" in str(got)
    engine.oom_above = 0
    assert isinstance(
        settle(runner, [runner.submit(row(1), time.monotonic() + 30)])[0], CaptionOutput
    )


class Suspect:
    """A crash guard whose task already killed a worker once."""

    suspect = True
    entered = 0

    def enter(self) -> None:
        self.entered += 1

    def exit(self) -> None:
        pass


def test_a_suspect_row_runs_with_no_other_row_beside_it(make_runner: Any) -> None:
    engine = FakeSlots(slots=4)
    runner = make_runner(engine)
    far = time.monotonic() + 30
    guard = Suspect()
    with runner._cond:  # all five arrive before the model thread looks
        before = [runner.submit(row(i, tokens=4), far) for i in range(2)]
        suspect = runner.submit(row(SUSPECT_TAG, tokens=4), far, guard)
        after = [runner.submit(row(i, tokens=4), far) for i in range(3, 5)]
    outputs = settle(runner, [*before, suspect, *after], timeout=10)
    assert all(isinstance(o, CaptionOutput) for o in outputs), outputs
    assert guard.entered == 1
    assert engine.live_beside_suspect == {1}  # it never shared a step
    assert engine.prefills == [2, 1, 2]


def test_a_row_that_breaks_prefill_fails_alone_and_its_group_is_captioned(
    make_runner: Any,
) -> None:
    engine = FakeSlots(slots=4)
    runner = make_runner(engine)
    far = time.monotonic() + 30
    with runner._cond:  # all three are prefilled as one group
        futures = [runner.submit(row(tag), far) for tag in (1, BROKEN_TAG, 2)]
    good, broken, other = settle(runner, futures, timeout=10)
    assert isinstance(broken, CaptionFailed)
    assert "this input breaks the model" in str(broken)
    assert (good.text, other.text) == ("row 1", "row 2")
    assert runner.is_alive()


def test_a_row_too_long_for_a_slot_that_breaks_generate_fails_typed(make_runner: Any) -> None:
    engine = FakeSlots(slots=2, capacity=20)
    runner = make_runner(engine)
    far = time.monotonic() + 30
    long_broken = runner.submit(row(BROKEN_TAG, tokens=30), far)
    long_fine = runner.submit(row(3, tokens=30), far)
    broken, fine = settle(runner, [long_broken, long_fine], timeout=10)
    assert isinstance(broken, CaptionFailed) and "this input breaks the model" in str(broken)
    assert isinstance(fine, CaptionOutput) and fine.text == "row 3"


# --- lanes -------------------------------------------------------------------------------------


def wait_live(engine: FakeSlots, rows: int) -> None:
    end = time.monotonic() + 5
    while engine.live < rows:
        assert time.monotonic() < end, "the rows were never admitted"
        time.sleep(0.001)


def test_an_interactive_row_takes_the_next_free_slot_ahead_of_forty_bulk_rows(
    make_runner: Any,
) -> None:
    engine = FakeSlots(slots=4)
    runner = make_runner(engine)
    far = time.monotonic() + 30
    with runner._cond:  # every bulk row waits before the model thread looks
        # The first four finish at different steps; the first slot frees after 30 steps.
        bulk = [
            runner.submit(row(i, tokens=30 + 10 * (i % 4)), far, lane="bulk") for i in range(20, 60)
        ]
    wait_live(engine, 4)
    urgent = runner.submit(row(100, tokens=4), far)  # interactive, the default
    outputs = settle(runner, [*bulk, urgent], timeout=30)
    assert all(isinstance(o, CaptionOutput) for o in outputs), outputs
    assert engine.admitted[:5] == [20, 21, 22, 23, 100]  # the next slot that freed
    assert engine.live_at_admit[100] == 3  # nothing was preempted for it
    assert sorted(engine.admitted) == [*range(20, 60), 100]  # and the bulk rows all ran


def test_free_slots_go_to_interactive_rows_before_bulk_rows(make_runner: Any) -> None:
    engine = FakeSlots(slots=8)
    runner = make_runner(engine)
    far = time.monotonic() + 30
    with runner._cond:  # sixteen rows, bulk first, arrive before the model thread looks
        bulk = [runner.submit(row(i, tokens=4), far, lane="bulk") for i in range(20, 28)]
        interactive = [runner.submit(row(i, tokens=4), far) for i in range(30, 38)]
    settle(runner, [*bulk, *interactive], timeout=10)
    assert sorted(engine.admitted[:8]) == list(range(30, 38))
    assert engine.prefills == [8, 8]


def test_interactive_rows_are_prefilled_first_whatever_their_length(make_runner: Any) -> None:
    engine = FakeSlots(slots=4, capacity=1000)
    runner = make_runner(engine)
    far = time.monotonic() + 30
    with runner._cond:
        futures = [runner.submit(row(i, prompt=10), far, lane="bulk") for i in range(2)]
        futures += [runner.submit(row(i, prompt=100), far) for i in range(2, 4)]
    settle(runner, futures, timeout=10)
    # Two prefill groups (10 and 100 tokens do not share one); the interactive one goes first.
    assert engine.admitted == [2, 3, 0, 1]
    assert engine.prefills == [2, 2]


def test_a_bulk_row_that_runs_alone_waits_while_an_interactive_row_waits_or_runs(
    make_runner: Any,
) -> None:
    engine = FakeSlots(slots=2, capacity=20)
    runner = make_runner(engine)
    far = time.monotonic() + 30
    with runner._cond:
        long_bulk = runner.submit(row(1, tokens=30), far, lane="bulk")  # too long for a slot
        short = runner.submit(row(2, tokens=5), far)
    outputs = settle(runner, [long_bulk, short], timeout=10)
    assert all(isinstance(o, CaptionOutput) for o in outputs), outputs
    assert engine.admitted == [2, 1]
    assert engine.live_at_admit[1] == 0  # it ran once the interactive row had left


def test_bulk_rows_alone_are_admitted_as_before(make_runner: Any) -> None:
    engine = FakeSlots(slots=3)
    runner = make_runner(engine)
    far = time.monotonic() + 30
    futures = [runner.submit(row(i, tokens=2 + i % 5), far, lane="bulk") for i in range(20, 30)]
    outputs = settle(runner, futures, timeout=10)
    assert [o.text for o in outputs] == [f"row {i}" for i in range(20, 30)]
    # Oldest first: bulk rows never starve without interactive load.
    assert engine.admitted == list(range(20, 30))
    assert engine.peak_live == 3


class BrokenDeviceSlots(FakeSlots):
    """The device fails in the third decode step, as CUDA does after an illegal access."""

    steps = 0

    def step(self) -> list[tuple[int, CaptionOutput]]:
        self.steps += 1
        if self.steps == 3:
            torch = pytest.importorskip("torch")
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        return super().step()


def test_a_device_failure_is_handed_over_while_the_live_rows_are_inside_the_model(
    make_runner: Any,
) -> None:
    handed: list[tuple[str, list[int]]] = []
    guards = [RecordingGuard() for _ in range(3)]

    def hand_over(exc: BaseException) -> None:
        handed.append((type(exc).__name__, [g.inside for g in guards]))

    runner = make_runner(BrokenDeviceSlots(slots=4), on_device_failure=hand_over)
    far = time.monotonic() + 30
    with runner._cond:
        futures = [runner.submit(row(i, tokens=8), far, guards[i]) for i in range(3)]
    settle(runner, futures, timeout=10)
    # The worker's hook exits the process here, its rows still inside the call: the exit
    # counts as a crash against each. (A hook that returns leaves the rows to fail.)
    assert handed == [("AcceleratorError", [1, 1, 1])]


def test_an_ordinary_model_error_is_the_rows_own_and_not_a_device_failure(
    make_runner: Any,
) -> None:
    handed: list[BaseException] = []
    runner = make_runner(FakeSlots(slots=2), on_device_failure=handed.append)
    far = time.monotonic() + 30
    broken = settle(runner, [runner.submit(row(BROKEN_TAG), far)], timeout=10)[0]
    assert isinstance(broken, CaptionFailed)
    assert handed == []
