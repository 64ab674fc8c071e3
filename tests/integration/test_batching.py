"""Batching with the real tiny SDNQ Qwen3-VL, in-process: a caption never depends on its batch.

Greedy captions of the tiny model always run to max_new_tokens, so every row of a batch
decodes for the full length and any difference left padding, row order or a neighbour makes
shows up in the text.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sdnq")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from tests.support.batching import running, settle  # noqa: E402
from tests.support.faulty_engine import FaultyEngine  # noqa: E402
from tests.support.images import encode  # noqa: E402
from worker.contract import CaptionResult, GenerationOptions, parse_request  # noqa: E402
from worker.engine.base import PATCH_PIXELS, CaptionOutput, PreparedInput  # noqa: E402
from worker.engine.hf_generate import GenerateEngine, load_engine  # noqa: E402
from worker.errors import CaptionFailed, InvalidImage  # noqa: E402
from worker.images import fit_pixel_budget  # noqa: E402
from worker.runtime.service import CaptionService  # noqa: E402
from worker.settings import Settings  # noqa: E402
from worker.storage.s3 import ObjectStore  # noqa: E402

MAX_PIXELS = PATCH_PIXELS * 48  # up to 48 image tokens: prompts from ~37 to ~87 tokens
MIN_PIXELS = PATCH_PIXELS * 4
MAX_NEW = 8
GREEDY = GenerationOptions()
# (width, height) before the pixel budget; 300x300 shrinks, 1x1 is scaled up by the processor.
SIZES = [(64, 64), (200, 120), (300, 300), (90, 400), (1, 1), (500, 80)]
PROMPTS = ["Describe this image.", "What is in the picture? Answer in one short sentence."]
KEYS = [(image, prompt) for image in range(len(SIZES)) for prompt in range(len(PROMPTS))]
Key = tuple[int, int]


def picture(index: int) -> Image.Image:
    """Seeded noise of SIZES[index]: every image has its own content."""
    width, height = SIZES[index]
    gen = torch.Generator().manual_seed(1000 + index)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="module")
def settings(tiny_model_dir: Path) -> Settings:
    return Settings(
        model=str(tiny_model_dir),
        dtype="float32",
        auto_download=False,
        max_pixels=MAX_PIXELS,
        min_pixels=MIN_PIXELS,
        task_deadline_s=60,
    )


@pytest.fixture(scope="module")
def engine(settings: Settings) -> GenerateEngine:
    return load_engine(settings)


def prepare(engine: GenerateEngine, key: Key, max_new_tokens: int = MAX_NEW) -> PreparedInput:
    image = fit_pixel_budget(picture(key[0]), MAX_PIXELS)
    return engine.prepare(
        image,
        PROMPTS[key[1]],
        max_new_tokens=max_new_tokens,
        options=GREEDY,
        max_pixels=MAX_PIXELS,
        min_pixels=MIN_PIXELS,
    )


@pytest.fixture(scope="module")
def items(engine: GenerateEngine) -> dict[Key, PreparedInput]:
    return {key: prepare(engine, key) for key in KEYS}


@pytest.fixture(scope="module")
def alone(engine: GenerateEngine, items: dict[Key, PreparedInput]) -> dict[Key, CaptionOutput]:
    """Each item's caption from a generate call of its own: the reference."""
    return {key: engine.generate([item])[0] for key, item in items.items()}


def assert_same_caption(got: CaptionOutput, ref: CaptionOutput, key: Key) -> None:
    assert got.text == ref.text, (key, got.text, ref.text)
    assert got.generated_tokens == ref.generated_tokens, key
    assert got.prompt_tokens == ref.prompt_tokens, key
    assert got.finish_reason == ref.finish_reason, key


class Recording:
    """A BatchEngine around an engine that records the size of every generate call."""

    def __init__(self, engine: GenerateEngine) -> None:
        self.engine = engine
        self.sizes: list[int] = []
        self.seconds: list[float] = []  # each generate call's duration
        self.oom_sizes: list[int] = []
        self.failed_sizes: list[int] = []

    @property
    def oom_errors(self) -> tuple[type[BaseException], ...]:
        return self.engine.oom_errors

    def release_memory(self) -> None:
        self.engine.release_memory()

    def generate(
        self, batch: Sequence[PreparedInput], deadlines: Sequence[float] | None = None
    ) -> list[CaptionOutput]:
        self.sizes.append(len(batch))
        started = time.perf_counter()
        try:
            return self.engine.generate(batch, deadlines)
        except self.engine.oom_errors:
            self.oom_sizes.append(len(batch))
            raise
        except Exception:
            self.failed_sizes.append(len(batch))
            raise
        finally:
            self.seconds.append(time.perf_counter() - started)


def test_alone_captions_tell_images_and_prompts_apart(alone: dict[Key, CaptionOutput]) -> None:
    # The comparisons below can only catch a swapped or corrupted row if captions differ.
    texts = [out.text for out in alone.values()]
    assert len(set(texts)) >= len(texts) - 2, texts
    for out in alone.values():
        assert out.text
        assert (out.generated_tokens, out.finish_reason) == (MAX_NEW, "length")
        assert out.batch_size == 1


@pytest.mark.parametrize(("size", "seed"), [(2, 1), (3, 2), (5, 3), (len(KEYS), 4)])
def test_batched_captions_equal_alone_captions(
    engine: GenerateEngine,
    items: dict[Key, PreparedInput],
    alone: dict[Key, CaptionOutput],
    size: int,
    seed: int,
) -> None:
    order = random.Random(seed).sample(KEYS, len(KEYS))
    lengths = {items[key].prompt_tokens for key in order}
    assert max(lengths) > 2 * min(lengths)  # the whole batch really is left-padded a lot
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        outputs = engine.generate([items[key] for key in chunk])
        assert len(outputs) == len(chunk)
        for key, out in zip(chunk, outputs, strict=True):
            assert_same_caption(out, alone[key], key)
            assert out.batch_size == len(chunk)


def test_each_row_stops_at_its_own_max_new_tokens(
    engine: GenerateEngine, items: dict[Key, PreparedInput], alone: dict[Key, CaptionOutput]
) -> None:
    wanted: dict[Key, int] = {(0, 0): 2, (2, 1): MAX_NEW, (3, 0): 5, (5, 1): 1}
    batch = {key: prepare(engine, key, n) for key, n in wanted.items()}
    outputs = engine.generate(list(batch.values()))

    for (key, n), out in zip(wanted.items(), outputs, strict=True):
        ref = alone[key] if n == MAX_NEW else engine.generate([batch[key]])[0]
        assert_same_caption(out, ref, key)
        assert (out.generated_tokens, out.finish_reason) == (n, "length"), key


def test_row_past_its_deadline_stops_without_changing_its_neighbour(
    engine: GenerateEngine, items: dict[Key, PreparedInput], alone: dict[Key, CaptionOutput]
) -> None:
    late, fine = (1, 0), (4, 1)
    now = time.monotonic()
    outputs = engine.generate([items[late], items[fine]], [now, now + 60])

    assert outputs[0].finish_reason == "timeout"
    assert outputs[0].generated_tokens < MAX_NEW
    assert_same_caption(outputs[1], alone[fine], fine)


def test_out_of_memory_split_gives_every_task_its_alone_caption(
    engine: GenerateEngine,
    alone: dict[Key, CaptionOutput],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAULT_OOM_ABOVE", "3")
    faulty = FaultyEngine(engine.model, engine.processor, engine.info, engine.repetition)
    model = Recording(faulty)
    keys = KEYS[:8]
    barrier = threading.Barrier(len(keys), timeout=30)

    with running(model, stop_timeout=30, max_batch=8, wait_s=5.0, pad_ratio=4.0) as batcher:

        def task(key: Key) -> Future[CaptionOutput]:
            with batcher.expect():  # as CaptionService does around download + prepare
                barrier.wait()  # every task is announced before any is submitted
                item = prepare(faulty, key)
                return batcher.submit(item, time.monotonic() + 60)

        with ThreadPoolExecutor(len(keys)) as pool:
            futures = list(pool.map(task, keys))
        outcomes = settle(batcher, futures, timeout=30.0)

    for key, outcome in zip(keys, outcomes, strict=True):
        assert isinstance(outcome, CaptionOutput), (key, outcome)
        assert_same_caption(outcome, alone[key], key)
    assert model.sizes[0] == 8  # the burst was one batch, and it did not fit
    assert model.oom_sizes and all(n > 3 for n in model.oom_sizes)
    succeeded = [n for n in model.sizes if n <= 3]
    assert sum(succeeded) == len(keys)
    assert batcher.batch_cap <= 3


def test_broken_row_fails_alone_and_its_neighbours_keep_their_captions(
    engine: GenerateEngine, items: dict[Key, PreparedInput], alone: dict[Key, CaptionOutput]
) -> None:
    good = [(0, 0), (2, 1), (5, 0)]
    # An input whose image grid does not match its pixels: generate raises on it.
    broken = dataclasses.replace(
        items[(3, 1)],
        tensors={**items[(3, 1)].tensors, "image_grid_thw": torch.tensor([[1, 2, 2]])},
    )
    batch = [items[good[0]], broken, items[good[1]], items[good[2]]]
    model = Recording(engine)

    with running(model, stop_timeout=30, max_batch=8, wait_s=5.0, pad_ratio=4.0) as batcher:
        with batcher.expect():
            futures = [batcher.submit(item, time.monotonic() + 60) for item in batch]
        outcomes = settle(batcher, futures, timeout=30.0)

    assert isinstance(outcomes[1], CaptionFailed), outcomes[1]
    for key, outcome in zip(good, [outcomes[0], *outcomes[2:]], strict=True):
        assert isinstance(outcome, CaptionOutput), (key, outcome)
        assert_same_caption(outcome, alone[key], key)
    assert model.sizes == [4, 1, 1, 1, 1]  # tried together, then each row alone
    assert model.failed_sizes == [4, 1]
    assert batcher.batch_cap == 8


def test_service_burst_with_an_undecodable_image_captions_the_rest(
    settings: Settings, engine: GenerateEngine, alone: dict[Key, CaptionOutput]
) -> None:
    model = Recording(engine)
    images = [0, 1, 3, 4]
    uploads: list[bytes] = [encode(picture(i)) for i in images]
    uploads.insert(2, b"\x89PNG\r\n\x1a\n but not really a PNG")

    # A short deadline: if the batcher breaks, the task threads give up soon after.
    fast = settings.model_copy(update={"task_deadline_s": 5.0})
    pool = ThreadPoolExecutor(len(uploads))
    with running(model, stop_timeout=30, max_batch=8, wait_s=0.5) as batcher:
        # data= bypasses S3, so the store's client is never used.
        store = ObjectStore(fast, client=object())
        service = CaptionService(fast, engine, store, batcher, "test")

        request = parse_request({"image": "local.png", "max_new_tokens": MAX_NEW}, fast)

        def task(data: bytes) -> CaptionResult | BaseException:
            try:
                return service.caption(request, data)
            except Exception as exc:
                return exc

        try:
            calls = [pool.submit(task, data) for data in uploads]
            results = settle(batcher, calls, timeout=30.0)
        finally:
            pool.shutdown(wait=False)

    assert isinstance(results.pop(2), InvalidImage)
    for index, result in zip(images, results, strict=True):
        assert isinstance(result, CaptionResult), (index, result)
        out = result.to_json()
        ref = alone[(index, 0)]  # PROMPTS[0] is the worker's default prompt
        assert (out["text"], out["generated_tokens"]) == (ref.text, MAX_NEW), index
        assert out["image_size"] == list(SIZES[index])
    assert sum(model.sizes) == len(images)


def test_an_interactive_row_waits_about_one_batch_behind_a_bulk_run(
    engine: GenerateEngine,
) -> None:
    """24 bulk rows of 64 tokens, then one interactive row of 8: it runs in the next batch,
    which bulk rows asking for more tokens do not join, so it waits for the running batch only.
    """
    model = Recording(engine)
    bulk_row, urgent_row = prepare(engine, (2, 0), 64), prepare(engine, (2, 0), 8)
    with running(model, stop_timeout=120, max_batch=8, wait_s=5.0) as batcher:
        far = time.monotonic() + 300
        with batcher.expect(lane="bulk"):  # one burst: full batches of 8
            bulk = [batcher.submit(bulk_row, far, lane="bulk") for _ in range(24)]
        while not model.sizes:  # the first bulk batch is running
            time.sleep(0.001)
        submitted = time.monotonic()
        urgent = batcher.submit(urgent_row, far)  # interactive, the default
        assert isinstance(settle(batcher, [urgent], timeout=120)[0], CaptionOutput)
        latency = time.monotonic() - submitted
        outcomes = settle(batcher, bulk, timeout=300)

    assert all(isinstance(o, CaptionOutput) for o in outcomes), outcomes
    batch_s = model.seconds[0]
    print(
        f"\ngenerate engine: bulk batch (8 rows x 64 tokens) {batch_s:.3f}s; "
        f"interactive row (8 tokens) latency {latency:.3f}s = {latency / batch_s:.2f} batches; "
        f"calls {model.sizes}, seconds {[round(x, 3) for x in model.seconds]}"
    )
    assert model.sizes == [8, 1, 8, 8]  # in the next call, without the longer bulk rows
    assert latency <= 1.5 * batch_s, (latency, batch_s)  # first-in-first-out: over 3 batches
