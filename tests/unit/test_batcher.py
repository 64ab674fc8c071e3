"""The Batcher thread against a fake engine: who shares a generate call, what each task gets.

The fake (``tests.support.fake_engine``) records every batch it is handed and answers each row
with a caption naming that row's tag, so a task that receives a neighbour's caption, or a
batch that mixes what must not be mixed, shows up directly. Inputs carry real (tiny) tensors,
as the engine's do. Which rows may share a batch, and when a batch starts, are pure
functions tested in ``test_policy``; these tests hold the thread to them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from tests.support.batching import RecordingGuard, running, settle  # noqa: E402
from tests.support.fake_engine import GREEDY, FakeEngine, item  # noqa: E402
from tests.support.images import png_bytes  # noqa: E402
from worker.batching.batcher import Batcher  # noqa: E402
from worker.batching.policy import BatchLimits  # noqa: E402
from worker.contract import GenerationOptions, parse_request  # noqa: E402
from worker.engine.base import CaptionOutput, PreparedInput  # noqa: E402
from worker.engine.hf_generate import collate  # noqa: E402
from worker.errors import CaptionFailed, CaptionTimeout  # noqa: E402
from worker.runtime.service import CaptionService  # noqa: E402
from worker.settings import Settings  # noqa: E402
from worker.storage.s3 import ObjectStore  # noqa: E402

SAMPLED = GenerationOptions(do_sample=True, temperature=0.7)
SAMPLED_SEEDED = GenerationOptions(do_sample=True, temperature=0.7, seed=1)
LATER = 60.0  # seconds: a deadline that never matters in these tests


def captions(outcomes: Sequence[CaptionOutput | BaseException]) -> list[str]:
    texts = []
    for outcome in outcomes:
        assert isinstance(outcome, CaptionOutput), outcome
        texts.append(outcome.text)
    return texts


def submit_all(batcher: Batcher, items: Sequence[PreparedInput]) -> list[Future[CaptionOutput]]:
    """Submit a burst as task threads would: announced first, so it is not split."""
    with batcher.expect():
        return [batcher.submit(entry, time.monotonic() + LATER) for entry in items]


def test_tasks_submitted_together_share_calls_up_to_max_batch() -> None:
    model = FakeEngine()
    with running(model, max_batch=4, wait_s=5.0) as batcher:
        outcomes = settle(batcher, submit_all(batcher, [item(t) for t in range(10)]))

    assert captions(outcomes) == [f"caption {t}" for t in range(10)]
    assert model.tag_batches() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [o.batch_size for o in outcomes if isinstance(o, CaptionOutput)] == [4] * 8 + [2] * 2


@pytest.mark.parametrize("announced", [False, True], ids=["bare-submit", "inside-expect"])
def test_lone_task_runs_at_once_when_nothing_else_is_preparing(announced: bool) -> None:
    model = FakeEngine()
    with running(model, wait_s=1.0) as batcher:
        started = time.monotonic()
        if announced:  # the service's own pattern: submit, then leave expect()
            with batcher.expect():
                future = batcher.submit(item(1), started + LATER)
        else:
            future = batcher.submit(item(1), started + LATER)
        assert captions(settle(batcher, [future])) == ["caption 1"]
        elapsed = time.monotonic() - started

    assert elapsed < 0.5, f"a lone task was held {elapsed:.2f}s with nothing else coming"
    assert model.sizes() == [1]


def test_open_expect_holds_the_batch_for_the_announced_task() -> None:
    model = FakeEngine()
    with running(model, wait_s=3.0) as batcher:
        started = time.monotonic()
        with batcher.expect():  # another task is still downloading
            first = batcher.submit(item(1), started + LATER)
            time.sleep(0.3)
            assert not first.done(), "ran without waiting for the announced task"
            second = batcher.submit(item(2), started + LATER)
        outcomes = settle(batcher, [first, second])
        elapsed = time.monotonic() - started

    assert captions(outcomes) == ["caption 1", "caption 2"]
    assert model.tag_batches() == [[1, 2]]
    # It ran when the announced task landed, not at the end of wait_s.
    assert elapsed < 2.0


def test_lone_task_waits_at_most_wait_s_for_an_announced_task() -> None:
    model = FakeEngine()
    wait_s = 0.5
    with running(model, wait_s=wait_s) as batcher, batcher.expect():  # never lands
        started = time.monotonic()
        future = batcher.submit(item(1), started + LATER)
        assert captions(settle(batcher, [future])) == ["caption 1"]
        elapsed = time.monotonic() - started

    assert wait_s * 0.9 <= elapsed < wait_s + 0.4
    assert model.sizes() == [1]


def test_different_generation_options_never_share_a_batch() -> None:
    options = [GREEDY, SAMPLED, GREEDY, SAMPLED_SEEDED, SAMPLED, GREEDY, SAMPLED_SEEDED]
    model = FakeEngine()
    with running(model, wait_s=5.0) as batcher:
        items = [item(t, options=o) for t, o in enumerate(options)]
        outcomes = settle(batcher, submit_all(batcher, items))

    assert captions(outcomes) == [f"caption {t}" for t in range(len(options))]
    for call in model.calls:
        assert len({entry.options for entry in call}) == 1, model.tag_batches()
    # Everything was waiting together, so each option set is exactly one call.
    assert sorted(map(sorted, model.tag_batches())) == [[0, 2, 5], [1, 4], [3, 6]]


def test_out_of_memory_splits_in_halves_and_later_batches_stay_at_the_size_that_fit() -> None:
    model = FakeEngine(oom_above=3)
    with running(model, wait_s=5.0, max_batch=8) as batcher:
        first = settle(batcher, submit_all(batcher, [item(t) for t in range(8)]))
        assert captions(first) == [f"caption {t}" for t in range(8)]
        assert model.tag_batches() == [
            [0, 1, 2, 3, 4, 5, 6, 7],
            [0, 1, 2, 3],
            [0, 1],
            [2, 3],
            [4, 5, 6, 7],
            [4, 5],
            [6, 7],
        ]
        assert model.releases == model.ooms == 3
        cap = batcher.batch_cap
        assert 2 <= cap <= 3

        model.calls.clear()
        later = settle(batcher, submit_all(batcher, [item(t) for t in range(10, 16)]))

    assert captions(later) == [f"caption {t}" for t in range(10, 16)]
    assert model.ooms == 3  # no new out-of-memory: the cap was remembered
    assert all(size == cap for size in model.sizes()[:-1])
    assert sum(model.sizes()) == 6


def test_a_row_too_big_even_alone_fails_alone_without_disabling_batching() -> None:
    model = FakeEngine(oom_tags=[2])
    with running(model, wait_s=5.0, max_batch=4) as batcher:
        outcomes = settle(batcher, submit_all(batcher, [item(t) for t in range(4)]))
        assert isinstance(outcomes[2], CaptionFailed)
        assert "out of memory" in str(outcomes[2])
        assert captions(outcomes[:2] + outcomes[3:]) == ["caption 0", "caption 1", "caption 3"]
        assert model.tag_batches() == [[0, 1, 2, 3], [0, 1], [2, 3], [2], [3]]

        # A batch of two fit; one oversized input must not turn batching off for good.
        model.calls.clear()
        later = settle(batcher, submit_all(batcher, [item(t) for t in range(10, 14)]))

    assert captions(later) == [f"caption {t}" for t in range(10, 14)]
    assert max(model.sizes()) >= 2, f"batch_cap fell to {batcher.batch_cap}"


def test_one_poisoned_row_fails_only_its_own_task() -> None:
    model = FakeEngine(poison_tags=[2])
    with running(model, wait_s=5.0, max_batch=8) as batcher:
        outcomes = settle(batcher, submit_all(batcher, [item(t) for t in range(5)]))

    assert isinstance(outcomes[2], CaptionFailed)
    assert "poisoned row" in str(outcomes[2])
    assert captions(outcomes[:2] + outcomes[3:]) == [f"caption {t}" for t in (0, 1, 3, 4)]
    assert model.tag_batches() == [[0, 1, 2, 3, 4], [0], [1], [2], [3], [4]]
    assert batcher.batch_cap == 8  # not an out-of-memory: the cap is untouched
    assert model.releases == 0


def test_deadline_passed_while_queued_fails_with_caption_timeout_unrun() -> None:
    gate = threading.Event()
    model = FakeEngine(gate=gate)
    with running(model, wait_s=0.0) as batcher:
        now = time.monotonic()
        busy = batcher.submit(item(1), now + LATER)
        while not model.calls:  # the model is now stuck on task 1
            time.sleep(0.01)
        expiring = batcher.submit(item(2), now + 0.2)
        patient = batcher.submit(item(3), now + LATER)
        time.sleep(0.4)
        gate.set()
        outcomes = settle(batcher, [busy, expiring, patient])

    assert isinstance(outcomes[1], CaptionTimeout)
    assert captions([outcomes[0], outcomes[2]]) == ["caption 1", "caption 3"]
    assert model.tag_batches() == [[1], [3]]  # the expired task never reached the model


def test_task_already_past_its_deadline_fails_at_once() -> None:
    model = FakeEngine()
    with running(model, wait_s=1.0) as batcher:
        future = batcher.submit(item(1), time.monotonic() - 1)
        outcome = settle(batcher, [future], timeout=0.5)[0]

    assert isinstance(outcome, CaptionTimeout)
    assert model.calls == []


def test_rows_get_their_own_deadlines_and_a_row_timed_out_in_the_model_fails() -> None:
    model = FakeEngine(timeout_tags=[1])
    with running(model, wait_s=5.0) as batcher:
        base = time.monotonic() + LATER
        with batcher.expect():
            futures = [batcher.submit(item(t), base + t) for t in range(3)]
        outcomes = settle(batcher, futures)

    assert isinstance(outcomes[1], CaptionTimeout)
    assert captions([outcomes[0], outcomes[2]]) == ["caption 0", "caption 2"]
    assert model.deadlines == [[base, base + 1, base + 2]]


def test_cancelled_task_is_not_captioned() -> None:
    gate = threading.Event()
    model = FakeEngine(gate=gate)
    with running(model, wait_s=0.0) as batcher:
        busy = batcher.submit(item(1), time.monotonic() + LATER)
        while not model.calls:
            time.sleep(0.01)
        abandoned = batcher.submit(item(2), time.monotonic() + LATER)
        assert abandoned.cancel()  # the task thread gave up waiting
        kept = batcher.submit(item(3), time.monotonic() + LATER)
        gate.set()
        outcomes = settle(batcher, [busy, kept])

    assert captions(outcomes) == ["caption 1", "caption 3"]
    assert model.tag_batches() == [[1], [3]]


def test_stop_finishes_queued_work_then_refuses_new_tasks() -> None:
    gate = threading.Event()
    model = FakeEngine(gate=gate)
    batcher = Batcher(model, BatchLimits(max_batch=2, wait_s=0.0))
    batcher.start()
    futures = [batcher.submit(item(0), time.monotonic() + LATER)]
    while not model.calls:
        time.sleep(0.01)
    futures += [batcher.submit(item(t), time.monotonic() + LATER) for t in range(1, 6)]
    stopper = threading.Thread(target=batcher.stop, kwargs={"timeout": 5})
    stopper.start()
    time.sleep(0.1)
    with pytest.raises(CaptionFailed, match="shutting down"):
        batcher.submit(item(9), time.monotonic() + LATER)
    gate.set()
    stopper.join(5)

    assert not stopper.is_alive()
    assert captions(settle(batcher, futures)) == [f"caption {t}" for t in range(6)]
    assert model.tag_batches() == [[0], [1, 2], [3, 4], [5]]


def test_busy_since_marks_the_generate_call_in_progress() -> None:
    # The hang watchdog (worker.runtime.watchdog) exits the process when busy_since is too old.
    model = FakeEngine()
    with running(model) as batcher:
        model.runner = batcher
        before = time.monotonic()
        future = batcher.submit(item(1), before + LATER)
        settle(batcher, [future])
        after = time.monotonic()

    assert len(model.busy_since_seen) == 1
    seen = model.busy_since_seen[0]
    assert seen is not None, "busy_since was not set while generate ran"
    assert before <= seen <= after
    assert batcher.busy_since is None


@pytest.mark.parametrize("first_len", [30, 1536], ids=["short", "as-wide-as-a-patch"])
def test_collate_left_pads_token_rows_and_stacks_image_rows(first_len: int) -> None:
    # Qwen3-VL pixel rows are 3 * 2 * 16 * 16 = 1536 wide, whatever the prompt length.
    def row(length: int, patches: int) -> dict[str, Any]:
        return {
            "input_ids": torch.full((1, length), 7, dtype=torch.long),
            "attention_mask": torch.ones((1, length), dtype=torch.long),
            "pixel_values": torch.ones((patches, 1536)),
            "image_grid_thw": torch.tensor([[1, 2, patches // 2]]),
        }

    batch = collate([row(first_len, 16), row(1600, 8)], pad_id=0)

    assert tuple(batch["input_ids"].shape) == (2, 1600)
    assert batch["input_ids"][0, : 1600 - first_len].eq(0).all()  # padded on the left
    assert batch["input_ids"][0, 1600 - first_len :].eq(7).all()
    assert int(batch["attention_mask"][0].sum()) == first_len
    assert tuple(batch["pixel_values"].shape) == (24, 1536)  # image rows are never padded
    assert tuple(batch["image_grid_thw"].shape) == (2, 3)


def test_a_task_that_crashed_a_worker_before_runs_alone_and_is_accounted() -> None:
    model = FakeEngine()
    guards = [RecordingGuard(suspect=tag == 2) for tag in range(5)]
    with running(model, max_batch=8, wait_s=0.5) as batcher:
        with batcher.expect():
            futures = [
                batcher.submit(item(tag), time.monotonic() + LATER, guards[tag]) for tag in range(5)
            ]
        outcomes = settle(batcher, futures)
    assert captions(outcomes) == [f"caption {tag}" for tag in range(5)]
    assert [2] in model.tag_batches()
    assert all(2 not in call or call == [2] for call in model.tag_batches())
    # Every row was inside exactly one generate call, and each call was left again.
    assert [g.entered for g in guards] == [1] * 5
    assert [g.inside for g in guards] == [0] * 5


class BrokenDevice(FakeEngine):
    """Every call fails as CUDA does once an illegal memory access broke the context."""

    def generate(
        self, batch: Sequence[PreparedInput], deadlines: Sequence[float] | None = None
    ) -> list[CaptionOutput]:
        self.calls.append(list(batch))
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")


def test_a_device_failure_is_handed_over_while_its_rows_are_inside_the_call() -> None:
    guards = [RecordingGuard(suspect=False) for _ in range(3)]
    handed: list[tuple[str, list[int]]] = []

    def hand_over(exc: BaseException) -> None:
        handed.append((type(exc).__name__, [g.inside for g in guards]))

    with running(BrokenDevice(), max_batch=8, wait_s=0.5, on_device_failure=hand_over) as batcher:
        with batcher.expect():
            futures = [
                batcher.submit(item(t), time.monotonic() + LATER, guards[t]) for t in range(3)
            ]
        outcomes = settle(batcher, futures)
    # The worker's hook exits the process at the first call, the rows inside it: the exit
    # counts as a crash against each. (A hook that returns leaves them to fail.)
    assert handed[0] == ("AcceleratorError", [1, 1, 1])
    assert all(isinstance(o, CaptionFailed) for o in outcomes)


def test_an_ordinary_model_error_is_no_device_failure() -> None:
    handed: list[BaseException] = []
    with running(FakeEngine(poison_tags=[1]), on_device_failure=handed.append) as batcher:
        outcome = settle(batcher, [batcher.submit(item(1), time.monotonic() + LATER)])[0]
    assert isinstance(outcome, CaptionFailed)
    assert handed == []


# --- lanes -------------------------------------------------------------------------------------


def blocked(batcher: Batcher, model: FakeEngine, tag: int = 999) -> Future[CaptionOutput]:
    """A bulk row that holds the model (at the gate) while the test queues rows behind it."""
    future = batcher.submit(item(tag), time.monotonic() + LATER, lane="bulk")
    while not model.calls:
        time.sleep(0.005)
    return future


def test_an_interactive_row_goes_in_the_next_batch_behind_forty_bulk_rows() -> None:
    gate = threading.Event()
    model = FakeEngine(gate=gate)
    with running(model, max_batch=8, wait_s=0.0) as batcher:
        first = blocked(batcher, model)
        later = time.monotonic() + LATER
        backlog = [batcher.submit(item(t), later, lane="bulk") for t in range(40)]
        urgent = batcher.submit(item(100), later)  # interactive, the default
        gate.set()
        outcomes = settle(batcher, [first, *backlog, urgent])

    assert captions(outcomes) == [
        "caption 999",
        *(f"caption {t}" for t in range(40)),
        "caption 100",
    ]
    batches = model.tag_batches()
    assert batches[1] == [100, 0, 1, 2, 3, 4, 5, 6]  # next batch, at its head; bulk fills it
    # Then the bulk rows go on, oldest first, in full batches: no bulk row was lost.
    assert batches[2:] == [list(range(s, min(s + 8, 40))) for s in range(7, 40, 8)]


def test_eight_interactive_and_eight_bulk_rows_make_an_interactive_batch_first() -> None:
    gate = threading.Event()
    model = FakeEngine(gate=gate)
    with running(model, max_batch=8, wait_s=0.0) as batcher:
        first = blocked(batcher, model)
        later = time.monotonic() + LATER
        futures = [
            batcher.submit(item(t), later, lane="bulk" if t % 2 == 0 else "interactive")
            for t in range(16)
        ]
        gate.set()
        settle(batcher, [first, *futures])

    assert model.tag_batches()[1:] == [list(range(1, 16, 2)), list(range(0, 16, 2))]


def test_bulk_rows_on_their_way_never_hold_a_waiting_interactive_row() -> None:
    model = FakeEngine()
    with running(model, max_batch=8, wait_s=3.0) as batcher:
        with batcher.expect(lane="bulk"):  # a bulk image still downloading
            started = time.monotonic()
            with batcher.expect():
                future = batcher.submit(item(1), started + LATER)
            assert captions(settle(batcher, [future])) == ["caption 1"]
            elapsed = time.monotonic() - started

            # A bulk row does wait for the bulk row on its way, as rows always have.
            waits = batcher.submit(item(2), time.monotonic() + LATER, lane="bulk")
            time.sleep(0.3)
            assert not waits.done(), "a bulk batch did not wait for the bulk row on its way"
        assert captions(settle(batcher, [waits])) == ["caption 2"]

    assert elapsed < 1.0, f"an interactive row was held {elapsed:.2f}s for a bulk row"
    assert model.tag_batches() == [[1], [2]]


def test_bulk_rows_run_as_usual_when_no_interactive_row_waits() -> None:
    model = FakeEngine()
    with running(model, max_batch=4, wait_s=5.0) as batcher:
        with batcher.expect(lane="bulk"):
            futures = [
                batcher.submit(item(t), time.monotonic() + LATER, lane="bulk") for t in range(10)
            ]
        outcomes = settle(batcher, futures)

    assert captions(outcomes) == [f"caption {t}" for t in range(10)]
    assert model.tag_batches() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


class _Delivered:
    """A metrics hook that records the lane of each caption delivered."""

    def __init__(self) -> None:
        self.lanes: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None

    def caption_delivered(self, lane: str, prompt_tokens: int, generated_tokens: int) -> None:
        self.lanes.append(lane)


def test_the_service_submits_its_lane_and_reports_it() -> None:
    model = FakeEngine()
    settings = Settings(task_deadline_s=10)
    metrics = _Delivered()
    with running(model, max_batch=4, wait_s=0.0) as batcher:
        submitted: list[str] = []
        submit = batcher.submit

        def recording_submit(*args: Any, **kwargs: Any) -> Future[CaptionOutput]:
            submitted.append(args[3] if len(args) > 3 else kwargs.get("lane", "interactive"))
            return submit(*args, **kwargs)

        batcher.submit = recording_submit  # type: ignore[method-assign]
        service = CaptionService(
            settings, model, ObjectStore(settings, client=object()), batcher, "test", metrics
        )
        request = parse_request({"image": "local.png", "max_new_tokens": 4}, settings)
        data = png_bytes()
        service.caption(request, data)
        service.caption(request, data, lane="bulk")

    assert submitted == ["interactive", "bulk"]
    assert metrics.lanes == ["interactive", "bulk"]
