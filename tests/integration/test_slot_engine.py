"""The slot engine with the real tiny SDNQ Qwen3-VL: every row's caption is the caption HF
``generate`` gives it alone, whenever it joins, whatever runs beside it.

The tiny model's greedy captions never end early, so each row decodes for its whole
``max_new_tokens`` and any difference a neighbour, a slot or a join step makes shows up in
the text.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sdnq")

from PIL import Image  # noqa: E402

from tests.support.batching import settle  # noqa: E402
from worker.batching.slot_runner import SlotRunner  # noqa: E402
from worker.contract import GenerationOptions  # noqa: E402
from worker.engine.base import PATCH_PIXELS, CaptionOutput, PreparedInput  # noqa: E402
from worker.engine.hf_generate import GenerateEngine, load_engine  # noqa: E402
from worker.engine.repetition import RepetitionGuard  # noqa: E402
from worker.engine.slot_engine import SlotEngine  # noqa: E402
from worker.errors import CaptionTimeout  # noqa: E402
from worker.images import fit_pixel_budget  # noqa: E402
from worker.settings import Settings  # noqa: E402

MAX_PIXELS = PATCH_PIXELS * 48
MIN_PIXELS = PATCH_PIXELS * 4
SIZES = [(64, 64), (200, 120), (300, 300), (90, 400), (1, 1), (500, 80)]
PROMPTS = ["Describe this image.", "What is in the picture? Answer in one short sentence."]
LENGTHS = [12, 5, 20, 9, 16, 3]
GREEDY = GenerationOptions()


def picture(index: int) -> Image.Image:
    width, height = SIZES[index]
    gen = torch.Generator().manual_seed(2000 + index)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> GenerateEngine:
    settings = Settings(
        model=str(tiny_model_dir),
        dtype="float32",
        auto_download=False,
        max_pixels=MAX_PIXELS,
        min_pixels=MIN_PIXELS,
    )
    return load_engine(settings)


def prepare(
    engine: GenerateEngine, index: int, options: GenerationOptions = GREEDY
) -> PreparedInput:
    return engine.prepare(
        fit_pixel_budget(picture(index), MAX_PIXELS),
        PROMPTS[index % 2],
        max_new_tokens=LENGTHS[index],
        options=options,
        max_pixels=MAX_PIXELS,
        min_pixels=MIN_PIXELS,
    )


@pytest.fixture(scope="module")
def rows(engine: GenerateEngine) -> list[PreparedInput]:
    return [prepare(engine, i) for i in range(len(SIZES))]


@pytest.fixture(scope="module")
def alone(engine: GenerateEngine, rows: list[PreparedInput]) -> list[CaptionOutput]:
    """Each row captioned by HF generate on its own: the reference."""
    return [engine.generate([row])[0] for row in rows]


def assert_same(got: CaptionOutput, ref: CaptionOutput, what: object) -> None:
    assert (got.text, got.generated_tokens, got.prompt_tokens, got.finish_reason) == (
        ref.text,
        ref.generated_tokens,
        ref.prompt_tokens,
        ref.finish_reason,
    ), what


def run_staggered(
    slots: SlotEngine, rows: list[PreparedInput], join_at: list[int]
) -> list[CaptionOutput]:
    """Admit row i at decode step join_at[i] (when a slot is free); step until all end."""
    outputs: dict[int, CaptionOutput] = {}
    owner: dict[int, int] = {}
    waiting = list(range(len(rows)))
    step = 0
    while len(outputs) < len(rows):
        # Rows joining at the same step are prefilled together, as one left-padded batch.
        joining = [i for i in waiting if join_at[i] <= step][: len(slots.free_slots())]
        pairs = list(zip(slots.free_slots(), joining, strict=False))
        for (slot, i), done in zip(
            pairs, slots.admit_many([(slot, rows[i]) for slot, i in pairs]), strict=True
        ):
            waiting.remove(i)
            if done is None:
                owner[slot] = i
            else:
                outputs[i] = done
        for slot, output in slots.step():
            outputs[owner.pop(slot)] = output
        step += 1
        assert step < 500, "rows never finished"
    return [outputs[i] for i in range(len(rows))]


@pytest.mark.parametrize(
    "dtype, weights, attention",
    [
        ("bfloat16", "sdnq", "sdpa"),
        ("bfloat16", "bf16", "sdpa"),
        ("bfloat16", "int8", "sdpa"),
        ("float32", "sdnq", "eager"),
        ("bfloat16", "sdnq", "eager"),
    ],
)
def test_rows_match_generate_alone_in_every_dtype_weight_form_and_attention(
    tiny_model_dir: Path, dtype: str, weights: str, attention: str
) -> None:
    """The GPU's dtype (bfloat16 keys, values, rope and masks in the hand-written decode
    step), each weight form, and eager attention (which adds its mask to the scores) give
    each row the caption ``generate`` gives it alone."""
    settings = Settings(
        model=str(tiny_model_dir),
        dtype=dtype,  # type: ignore[arg-type]
        weights=weights,  # type: ignore[arg-type]
        attn_implementation=attention,  # type: ignore[arg-type]
        auto_download=False,
        max_pixels=MAX_PIXELS,
        min_pixels=MIN_PIXELS,
    )
    engine = load_engine(settings)
    assert engine.model.config.text_config._attn_implementation == attention
    rows = [prepare(engine, i) for i in range(len(SIZES))]
    slots = SlotEngine(engine, slots=4, capacity=256)
    assert slots.cache.keys[0].dtype == getattr(torch, dtype)
    got = run_staggered(slots, rows, join_at=[0, 0, 3, 4, 4, 11])
    for i, row in enumerate(rows):
        assert_same(got[i], engine.generate([row])[0], i)


def test_rows_joining_at_different_steps_match_generate_alone(
    engine: GenerateEngine, rows: list[PreparedInput], alone: list[CaptionOutput]
) -> None:
    slots = SlotEngine(engine, slots=4, capacity=256)
    # Six rows, four slots: later rows wait for a slot and reuse a freed one.
    got = run_staggered(slots, rows, join_at=[0, 0, 3, 4, 4, 11])
    for i, (output, ref) in enumerate(zip(got, alone, strict=True)):
        assert_same(output, ref, i)
    assert max(o.batch_size for o in got) == 4
    assert slots.live == 0


def test_order_and_slot_do_not_change_a_caption(
    engine: GenerateEngine, rows: list[PreparedInput], alone: list[CaptionOutput]
) -> None:
    slots = SlotEngine(engine, slots=6, capacity=256)
    order = [5, 2, 0, 4, 1, 3]
    got = run_staggered(slots, [rows[i] for i in order], join_at=[0, 1, 1, 2, 7, 7])
    for output, i in zip(got, order, strict=True):
        assert_same(output, alone[i], i)


def test_end_of_sequence_stops_a_row_like_generate(
    engine: GenerateEngine, rows: list[PreparedInput], alone: list[CaptionOutput]
) -> None:
    """Make the third token of row 2's caption an end-of-sequence token for both engines."""
    token = engine.processor.tokenizer(alone[2].text.split()[0])["input_ids"][0]
    original = engine.model.generation_config
    config = copy.deepcopy(original)
    config.eos_token_id = [*engine.eos_ids, int(token)]
    engine.model.generation_config = config
    try:
        ref = engine.generate([rows[2]])[0]
        slots = SlotEngine(engine, slots=2, capacity=256)
        got = run_staggered(slots, [rows[2], rows[0]], join_at=[0, 0])
    finally:
        engine.model.generation_config = original
    assert ref.finish_reason == "stop"
    assert ref.generated_tokens < LENGTHS[2]
    assert_same(got[0], ref, "stopped row")
    assert got[1].text == alone[0].text


def test_seeded_sampled_row_is_the_same_alone_and_beside_others(
    engine: GenerateEngine, rows: list[PreparedInput]
) -> None:
    sampled = GenerationOptions(do_sample=True, temperature=1.5, top_k=40, top_p=0.95, seed=7)
    other = GenerationOptions(do_sample=True, temperature=0.8, seed=99)
    mine = prepare(engine, 1, sampled)
    lone = run_staggered(SlotEngine(engine, slots=3, capacity=256), [mine], [0])[0]
    crowd = [prepare(engine, 0), mine, prepare(engine, 3, other)]
    beside = run_staggered(SlotEngine(engine, slots=3, capacity=256), crowd, [0, 2, 1])
    assert beside[1].text == lone.text
    assert beside[0].text == engine.generate([crowd[0]])[0].text  # greedy neighbour unchanged
    reseeded = prepare(engine, 1, dataclasses.replace(sampled, seed=8))
    other_seed = run_staggered(SlotEngine(engine, slots=1, capacity=256), [reseeded], [0])[0]
    assert other_seed.text != lone.text  # the seed is what made it reproducible


def test_repetition_penalty_matches_generate(engine: GenerateEngine) -> None:
    options = GenerationOptions(repetition_penalty=1.3)
    row = prepare(engine, 2, options)
    ref = engine.generate([row])[0]
    got = run_staggered(
        SlotEngine(engine, slots=2, capacity=256), [row, prepare(engine, 0)], [0, 1]
    )
    assert_same(got[0], ref, "penalised row")
    assert got[0].text != engine.generate([prepare(engine, 2)])[0].text


@pytest.fixture()
def runner(engine: GenerateEngine) -> Iterator[SlotRunner]:
    runner = SlotRunner(SlotEngine(engine, slots=3, capacity=128))
    runner.start()
    yield runner
    runner.stop(timeout=30)


def test_runner_answers_every_row_with_its_lone_caption(
    runner: SlotRunner, rows: list[PreparedInput], alone: list[CaptionOutput]
) -> None:
    far = time.monotonic() + 60
    futures = []
    for i, row in enumerate(rows):
        futures.append(runner.submit(row, far))
        if i % 2:
            time.sleep(0.05)  # rows arrive while others decode
    for i, got in enumerate(settle(runner, futures, timeout=60)):
        assert isinstance(got, CaptionOutput), got
        assert_same(got, alone[i], i)


def test_row_too_long_for_a_slot_runs_alone_through_generate(
    engine: GenerateEngine, runner: SlotRunner, rows: list[PreparedInput]
) -> None:
    long_row = dataclasses.replace(rows[2], max_new_tokens=200)  # prompt + 200 > 128
    ref = engine.generate([long_row])[0]
    far = time.monotonic() + 120
    got = settle(runner, [runner.submit(long_row, far), runner.submit(rows[0], far)], 120)
    assert isinstance(got[0], CaptionOutput), got[0]
    assert_same(got[0], ref, "long row")
    assert isinstance(got[1], CaptionOutput), got[1]


def test_row_past_its_deadline_times_out_and_frees_its_slot(
    engine: GenerateEngine, rows: list[PreparedInput], alone: list[CaptionOutput]
) -> None:
    runner = SlotRunner(SlotEngine(engine, slots=3, capacity=1024))
    runner.start()
    try:
        _deadline_frees_the_slot(runner, rows, alone)
    finally:
        runner.stop(timeout=30)


def _deadline_frees_the_slot(
    runner: SlotRunner, rows: list[PreparedInput], alone: list[CaptionOutput]
) -> None:
    # A row in a slot that, left alone, decodes 387 tokens before its repetition stop
    # (0.9 s on the CI machine, idle): three times its 0.3 s.
    slow = dataclasses.replace(rows[2], max_new_tokens=600)
    doomed = runner.submit(slow, time.monotonic() + 0.3)
    fine = runner.submit(rows[1], time.monotonic() + 60)
    got = settle(runner, [doomed, fine], timeout=60)
    assert isinstance(got[0], CaptionTimeout), got[0]
    assert isinstance(got[1], CaptionOutput) and got[1].text == alone[1].text
    later = settle(runner, [runner.submit(rows[3], time.monotonic() + 60)], timeout=60)[0]
    assert isinstance(later, CaptionOutput) and later.text == alone[3].text


def test_a_looping_caption_stops_with_repetition_in_both_engines(
    engine: GenerateEngine, rows: list[PreparedInput]
) -> None:
    """Row 2's caption settles into a two-token loop; a short guard cuts it in both engines."""
    guarded = GenerateEngine(
        engine.model, engine.processor, engine.info, repetition=RepetitionGuard(6, 3)
    )
    looping = dataclasses.replace(rows[2], max_new_tokens=40)
    ref = guarded.generate([looping])[0]
    got = run_staggered(SlotEngine(guarded, slots=2, capacity=256), [looping, rows[0]], [0, 0])
    assert ref.finish_reason == "repetition"
    assert 6 <= ref.generated_tokens < 40
    assert_same(got[0], ref, "looping row")
    assert_same(got[1], guarded.generate([rows[0]])[0], "neighbour")
    off = GenerateEngine(engine.model, engine.processor, engine.info, RepetitionGuard(0, 3))
    assert off.generate([looping])[0].finish_reason == "length"


def test_an_interactive_row_waits_about_one_batch_behind_a_bulk_run(
    engine: GenerateEngine, rows: list[PreparedInput]
) -> None:
    """24 bulk rows of 64 tokens fill 8 slots three times over; one interactive row of 8
    tokens sent once they decode takes the next slot that frees, ahead of the 16 waiting."""
    runner = SlotRunner(SlotEngine(engine, slots=8, capacity=256))
    runner.start()
    bulk_row = dataclasses.replace(rows[2], max_new_tokens=64)
    urgent_row = dataclasses.replace(rows[2], max_new_tokens=8)
    done: dict[int, float] = {}

    def track(future: Future[CaptionOutput], key: int) -> None:
        future.add_done_callback(lambda _: done.setdefault(key, time.monotonic()))

    try:
        far = time.monotonic() + 300
        started = time.monotonic()
        with runner._cond:  # all 24 wait before the model thread looks: 8 join at once
            bulk = [runner.submit(bulk_row, far, lane="bulk") for _ in range(24)]
        for i, future in enumerate(bulk):
            track(future, i)
        while runner.busy_since is None:  # the first 8 are being prefilled or decoded
            time.sleep(0.001)
        submitted = time.monotonic()
        urgent = runner.submit(urgent_row, far)  # interactive, the default
        track(urgent, -1)
        outcomes = settle(runner, [urgent, *bulk], timeout=300)
    finally:
        runner.stop(timeout=60)

    assert all(isinstance(o, CaptionOutput) for o in outcomes), outcomes
    assert isinstance(outcomes[0], CaptionOutput) and outcomes[0].generated_tokens == 8
    batch_s = min(done[i] for i in range(24)) - started  # the first 8 bulk rows, together
    latency = done[-1] - submitted
    print(
        f"\nslot engine: bulk batch (8 slots x 64 tokens) {batch_s:.3f}s; "
        f"interactive row (8 tokens) latency {latency:.3f}s = {latency / batch_s:.2f} batches; "
        f"all 24 bulk rows {max(done[i] for i in range(24)) - started:.3f}s"
    )
    # It finished before the second wave of bulk rows (first-in-first-out: after the third).
    assert done[-1] < sorted(done[i] for i in range(24))[8]
    assert latency <= 1.5 * batch_s, (latency, batch_s)


class ReplayRecorder:
    """A CPU stand-in for CUDA graph capture with a graph's contract: the step is bound to
    static input tensors at capture, and a replay recomputes it from whatever they hold
    into one static output tensor."""

    def __init__(self, fail: bool = False, skew: float = 0.0, skew_from: int = 0) -> None:
        self.fail = fail
        self.skew = skew
        self.skew_from = skew_from  # graphs recorded before this one replay exactly
        self.recorded = 0
        self.replays = 0

    def record(self, run: Any) -> tuple[Any, torch.Tensor]:
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        output = run().clone()
        skew = self.skew if self.recorded >= self.skew_from else 0.0
        self.recorded += 1

        def replay() -> None:
            self.replays += 1
            output.copy_(run() + skew)

        return replay, output


def test_the_decode_step_through_captured_graphs_gives_the_same_captions(
    engine: GenerateEngine, rows: list[PreparedInput], alone: list[CaptionOutput]
) -> None:
    recorder = ReplayRecorder()
    slots = SlotEngine(engine, slots=4, capacity=512, recorder=recorder)
    slots.warm_up()
    assert slots.graphs is not None
    # Every shape a step can take was captured at start: live slots 1, 2, 4 and cache
    # positions 256, 512.
    assert slots.graphs.shapes == [(n, k) for n in (1, 2, 4) for k in (256, 512)]
    before = recorder.replays
    got = run_staggered(slots, rows, join_at=[0, 0, 3, 4, 4, 11])
    for i, (output, ref) in enumerate(zip(got, alone, strict=True)):
        assert_same(output, ref, i)
    assert recorder.replays - before > 20  # the steps went through the replays


@pytest.mark.parametrize(
    "recorder",
    [
        ReplayRecorder(fail=True),
        ReplayRecorder(skew=5.0),
        # Only the last bucket (2 slots x 256 positions) is wrong: each one is checked.
        ReplayRecorder(skew=5.0, skew_from=1),
    ],
    ids=["capture-fails", "every-graph-wrong", "last-graph-wrong"],
)
def test_a_capture_that_fails_or_disagrees_leaves_the_engine_on_the_eager_step(
    engine: GenerateEngine,
    rows: list[PreparedInput],
    alone: list[CaptionOutput],
    recorder: ReplayRecorder,
) -> None:
    slots = SlotEngine(engine, slots=2, capacity=256, recorder=recorder)
    slots.warm_up()
    assert slots.graphs is None
    got = run_staggered(slots, rows[:2], join_at=[0, 1])
    for i, (output, ref) in enumerate(zip(got, alone[:2], strict=True)):
        assert_same(output, ref, i)


def test_graphs_are_off_on_the_cpu_and_when_disabled(engine: GenerateEngine) -> None:
    assert SlotEngine(engine, slots=2, capacity=256).graphs is None  # the CPU
    assert SlotEngine(engine, slots=2, capacity=256, cuda_graphs=False).graphs is None


def test_a_prefill_that_fails_part_way_leaves_no_row_live(
    engine: GenerateEngine, rows: list[PreparedInput], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner fails (or retries) every row of a failed prefill, so none may stay in a
    slot, decoding for nobody."""
    from worker.engine import slot_engine

    slots = SlotEngine(engine, slots=3, capacity=256)
    real = slot_engine.RowSampler.for_row
    calls = []

    def second_fails(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected after the first row was admitted")
        return real(*args, **kwargs)

    monkeypatch.setattr(slot_engine.RowSampler, "for_row", second_fails)
    with pytest.raises(RuntimeError, match="injected"):
        slots.admit_many([(0, rows[0]), (1, rows[1]), (2, rows[3])])
    assert slots.live == 0 and slots.free_slots() == [0, 1, 2]
    monkeypatch.undo()
    got = run_staggered(slots, [rows[0]], join_at=[0])[0]
    assert got.text == engine.generate([rows[0]])[0].text


def test_the_kv_budget_counts_what_the_cache_allocates(engine: GenerateEngine) -> None:
    from worker.engine.kv_budget import kv_bytes_per_slot

    slots = SlotEngine(engine, slots=3, capacity=256)
    assert slots.cache.nbytes == 3 * kv_bytes_per_slot(engine.model, 256)


def test_a_device_without_room_for_every_slot_starts_with_fewer_or_refuses_a_set_count(
    tiny_model_dir: Path, engine: GenerateEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's own path (``bootstrap.load_engine``) with the device's free memory
    pretended: room for two and a half slots after the activation margin."""
    from worker.engine import kv_budget
    from worker.engine.loading import ACTIVATION_MARGIN_BYTES
    from worker.errors import ModelLoadError
    from worker.runtime.bootstrap import load_engine as load_worker_engine

    per_slot = kv_budget.kv_bytes_per_slot(engine.model, 512)
    free = ACTIVATION_MARGIN_BYTES + 5 * per_slot // 2
    monkeypatch.setattr(kv_budget, "free_device_bytes", lambda device: free)
    common: dict[str, Any] = {
        "model": str(tiny_model_dir),
        "dtype": "float32",
        "auto_download": False,
        "max_batch": 6,
        "slot_tokens": 512,
    }
    slots = load_worker_engine(Settings(**common))
    assert isinstance(slots, SlotEngine) and slots.slots == 2
    with pytest.raises(ModelLoadError, match=r"6 slots of 512 tokens need .*\(2 would fit\)"):
        load_worker_engine(Settings(**common, slots=6))
