"""Continuous batching through a real worker: a short task sent while 24 long captions decode
finishes long before them with ``CAPTION_ENGINE=slots``; with ``generate`` it waits for the
whole batch. The figures are printed (``pytest -s``) for both engines.

The long tasks' decode steps each take 4 ms more (the fault-injection engine's ``[slow]``,
about what a GPU step at this batch costs), so their batch outlasts the 1 s before the short
task is sent on any machine; the short task's own steps are not delayed by ``generate`` and
share the delayed steps under ``slots``, as a GPU's would.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.stack import WorkerStack
from tests.support.waits import wait_until
from worker.devtools.loopback import LoopbackS3

LONG_TASKS = 24
LONG_TOKENS = 384
SHORT_TOKENS = 16
LONG_PROMPT = "[slow] Describe this image."
STEP_DELAY_S = "0.004"
TIMEOUT_S = 300.0


def _short_during_long(stack: WorkerStack) -> dict[str, float]:
    """Send the long tasks, wait until all run plus 1 s, send the short one; time both, and
    count the long tasks already finished when the short one's result arrived."""
    uri = stack.upload("picture.png")
    started = time.monotonic()
    longs = [
        stack.send(image=uri, prompt=LONG_PROMPT, max_new_tokens=LONG_TOKENS)
        for _ in range(LONG_TASKS)
    ]
    wait_until(
        lambda: all(t.state == "STARTED" for t in longs), TIMEOUT_S, "every long task started"
    )
    running = time.monotonic()
    time.sleep(1.0)
    assert not any(t.ready() for t in longs), "the long batch ended before the short task"
    sent = time.monotonic()
    short = stack.send(image=uri, max_new_tokens=SHORT_TOKENS)
    short_result = short.get(timeout=TIMEOUT_S, interval=0.05)
    short_done = time.monotonic()
    longs_finished_first = sum(t.ready() for t in longs)
    long_results = [t.get(timeout=TIMEOUT_S, interval=0.05) for t in longs]
    longs_done = time.monotonic()
    assert short_result["generated_tokens"] == SHORT_TOKENS
    assert all(r["generated_tokens"] == LONG_TOKENS for r in long_results)
    return {
        "long_batch_s": round(longs_done - running, 2),
        "short_latency_s": round(short_done - sent, 2),
        "all_sent_to_running_s": round(running - started, 2),
        "longs_finished_before_short": longs_finished_first,
    }


@pytest.mark.parametrize("engine", ["generate", "slots"])
def test_a_short_task_sent_mid_batch_does_not_wait_for_the_batch(
    engine: str, tiny_model_dir: Path, s3_server: LoopbackS3, redis_url: str, tmp_path: Path
) -> None:
    with WorkerStack(
        tiny_model_dir,
        s3_server,
        tmp_path,
        name=f"latency-{engine}",
        redis=redis_url,
        faulty=True,
        FAULT_STEP_DELAY_S=STEP_DELAY_S,
        CAPTION_ENGINE=engine,
        CAPTION_MAX_BATCH="32",
        CAPTION_SLOTS="32",
        CAPTION_REPETITION_SPAN="0",  # the tiny model loops; every caption runs its full length
        CAPTION_TASK_DEADLINE_S="200",
        OMP_NUM_THREADS="1",
    ) as stack:
        stack.start_worker(engine)
        figures = _short_during_long(stack)
    print(f"\n{engine}: {figures}")
    if engine == "slots":
        assert figures["short_latency_s"] < figures["long_batch_s"] / 3, figures
        assert figures["longs_finished_before_short"] == 0, figures
    else:  # the reference engine: the short task waits for the running batch to finish
        # (Most, not all: the long tasks' threads store their results while the short
        # caption decodes, and a store can lag it.)
        assert figures["longs_finished_before_short"] >= LONG_TASKS // 2, figures
