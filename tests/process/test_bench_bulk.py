"""``caption-worker bench --mode path`` measures a bulk run against tasks on the same images.

A smoke run of the command as a user runs it: the tiny model, the loopback S3 server it
starts, the machine's Redis (or a private one), one batched worker. No ratio is asserted:
timing on a shared 2-core machine is noise; the figures are printed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.process.test_cli import run

pytestmark = pytest.mark.timeout(600)

TASKS, MAX_BATCH, NEW_TOKENS = 48, 8, 4


@pytest.mark.parametrize("mixed", [False, True], ids=["prefix", "manifest"])
def test_bench_path_reports_a_bulk_run_over_the_same_images(
    tiny_model_dir: Path, tmp_path: Path, mixed: bool
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny-model").symlink_to(tiny_model_dir)  # the bench reuses it by this name
    out = run(
        "bench", "--mode", "path", "--tasks", str(TASKS), "--max-batch", str(MAX_BATCH),
        "--new-tokens", str(NEW_TOKENS), "--image-px", "64", "--no-single",
        *(["--mixed"] if mixed else []),
        "--models-dir", str(models), "--json-out", str(tmp_path / "bench.json"),
        env={"OMP_NUM_THREADS": "2"}, timeout=540,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    path = json.loads((tmp_path / "bench.json").read_text())["path"]
    tasks, bulk = path["batched"], path["bulk"]
    assert "one_at_a_time" not in path
    assert tasks["tasks"] == TASKS and bulk["images"] == TASKS
    assert bulk["source"] == ("manifest" if mixed else "prefix")
    # The same work: every caption as long as the tasks' (the tiny model never stops early).
    assert bulk["generated_tokens"] == tasks["generated_tokens"]
    assert bulk["images_per_s"] > 0 and bulk["images_per_s_from_enqueue"] > 0
    assert bulk["seconds"] >= bulk["enqueue_to_done_seconds"] > 0
    assert bulk["shard_size"] >= 2 * MAX_BATCH and bulk["shards"] >= 2
    assert 1 <= bulk["window"] <= bulk["shards"]
    assert path["bulk_vs_tasks"] == pytest.approx(
        bulk["images_per_s"] / tasks["tasks_per_s"], abs=0.01
    )
    print(
        f"\nbench path ({'manifest' if mixed else 'prefix'}): tasks {tasks['tasks_per_s']}/s, "
        f"bulk {bulk['images_per_s']}/s ({bulk['images_per_s_from_enqueue']}/s from enqueue), "
        f"bulk_vs_tasks {path['bulk_vs_tasks']}"
    )
