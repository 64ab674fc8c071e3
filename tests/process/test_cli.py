"""The ``caption-worker`` command line, run as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.images import png_bytes

CLI = str(Path(sys.executable).with_name("caption-worker"))


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "SDNQ_USE_TORCH_COMPILE": "0", **(env or {})},
    )


def test_models_lists_the_catalogue_and_marks_image_models() -> None:
    out = run("models")
    assert out.returncode == 0, out.stderr
    assert "Qwen3-VL-32B-Instruct-SDNQ-uint4" in out.stdout
    assert "Disty0/Qwen3-VL-32B-Instruct-SDNQ-uint4-svd-r32" in out.stdout
    assert "output image (refuses)" in out.stdout
    assert "output text (serves)" in out.stdout


def test_worker_starts_one_process_per_visible_gpu() -> None:
    out = run("worker", "--dry-run", env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("CUDA_VISIBLE_DEVICES=0 ") and "--hostname gpu0@%h" in lines[0]
    assert lines[1].startswith("CUDA_VISIBLE_DEVICES=1 ") and "--hostname gpu1@%h" in lines[1]
    assert all("-m celery -A worker.app worker --queues captions" in line for line in lines)


def test_worker_without_gpus_runs_one_cpu_worker() -> None:
    out = run("worker", "--dry-run", env={"CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr
    [line] = out.stdout.strip().splitlines()
    assert "--hostname cpu@%h" in line


def test_invalid_setting_stops_the_worker_command_naming_the_variable() -> None:
    out = run("worker", "--dry-run", env={"CAPTION_MAX_BATCH": "lots"})
    assert out.returncode == 2
    assert "CAPTION_MAX_BATCH" in out.stderr


def test_caption_runs_the_engine_in_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes())
    env = {"CAPTION_MODEL": str(tiny_model_dir), "CAPTION_DTYPE": "float32"}
    out = run("caption", str(image), "--max-new-tokens", "6", env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["text"].strip()
    assert result["generated_tokens"] == 6
    assert result["image"] == str(image)


def test_caption_of_a_missing_file_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = run("caption", str(tmp_path / "nope.png"), env={"CAPTION_MODEL": str(tiny_model_dir)})
    assert out.returncode == 1
    assert "ImageNotFound" in out.stderr and "nope.png" in out.stderr


def test_caption_with_an_uncached_model_and_no_download_names_the_model(tmp_path: Path) -> None:
    env = {
        "CAPTION_MODEL": "acme/not-cached-anywhere",
        "CAPTION_AUTO_DOWNLOAD": "false",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
    }
    image = tmp_path / "x.png"
    image.write_bytes(png_bytes())
    out = run("caption", str(image), env=env)
    assert out.returncode == 1
    assert "ModelLoadError" in out.stderr
    assert "acme/not-cached-anywhere" in out.stderr and "CAPTION_AUTO_DOWNLOAD" in out.stderr


def test_tiny_model_command_writes_a_loadable_repo(tmp_path: Path) -> None:
    out = run("tiny-model", str(tmp_path / "tiny"))
    assert out.returncode == 0, out.stderr
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "sdnq"


def test_bench_engine_mode_prints_the_figures_and_the_machine(tmp_path: Path) -> None:
    # A smoke run of the benchmark command (no timing asserted: benchmarks are commands).
    out = run(
        "bench", "--mode", "engine", "--random-shape", "tiny-test", "--tasks", "3",
        "--max-batch", "3", "--new-tokens", "3", "--image-px", "64",
        "--json-out", str(tmp_path / "bench.json"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["machine"]["cores"] and "cpu" in report["machine"]
    for label in ("one_at_a_time", "batched"):
        figures = report["engine"][label]
        assert figures["images"] == 3
        assert figures["generated_tokens_per_s"] > 0
        assert figures["p95_latency_s"] >= figures["p50_latency_s"] > 0
    assert report["engine"]["batched"]["batch"] == 3
    assert report["engine"]["peak_memory_gib"] > 0


def test_bench_with_a_refused_engine_and_memory_mode_prints_one_error_line() -> None:
    out = run(
        "bench", "--mode", "engine", "--tasks", "1", "--new-tokens", "1", "--no-single",
        env={"CAPTION_MEMORY_MODE": "lowvram"},
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    [line] = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert "ConfigError" in line and "CAPTION_MEMORY_MODE=gpu" in line
    assert "CAPTION_ENGINE=generate" in line
    assert out.stdout == ""
