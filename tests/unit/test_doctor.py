"""``caption-worker doctor``'s checks, each against given values: what an operator reads."""

from __future__ import annotations

import json
import struct
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from worker.engine.catalogue import resolve_model
from worker.engine.footprint import Footprint, estimate_footprint
from worker.ops.doctor import (
    GIB,
    CeleryValues,
    CheckResult,
    Gpu,
    GpuProbe,
    ModelFiles,
    Status,
    check_gpu,
    check_model,
    check_object,
    check_prefetch,
    check_result_backend,
    check_result_expiry,
    check_task_events,
    check_visibility_timeout,
    check_weights_fit,
    exit_code,
    format_json,
    format_text,
    model_files_in,
)
from worker.settings import Settings

H200 = Gpu(0, "NVIDIA H200", total_bytes=140 * GIB, free_bytes=139 * GIB)
SMALL = Gpu(1, "NVIDIA L4", total_bytes=24 * GIB, free_bytes=22 * GIB)
CUDA = "12.8"


def footprint(weights_gib: float, extra_gib: float = 0, reserve_gib: float = 2) -> Footprint:
    return Footprint(int(weights_gib * GIB), int(extra_gib * GIB), int(reserve_gib * GIB), True)


# --- Celery settings ---------------------------------------------------------------------------


def test_visibility_timeout_too_short_fails_naming_the_variable() -> None:
    result = check_visibility_timeout(Settings(visibility_timeout_s=100, task_deadline_s=600))
    assert result.status is Status.FAIL
    assert result.message.startswith("CAPTION_VISIBILITY_TIMEOUT_S=100 must exceed")
    assert "CAPTION_TASK_DEADLINE_S" in result.message


def test_visibility_timeout_above_deadline_and_margin_passes() -> None:
    result = check_visibility_timeout(Settings(visibility_timeout_s=3600, task_deadline_s=600))
    assert result.status is Status.OK
    assert "CAPTION_VISIBILITY_TIMEOUT_S=3600" in result.message


def test_visibility_timeout_is_skipped_for_rabbitmq_with_its_own_caveat() -> None:
    settings = Settings(broker_url="amqp://guest:guest@rabbit//", visibility_timeout_s=100)
    result = check_visibility_timeout(settings)
    assert result.status is Status.SKIP
    assert "consumer_timeout" in result.message


def test_prefetch_above_one_fails_and_says_why() -> None:
    result = check_prefetch(4, task_threads=36)
    assert result.status is Status.FAIL
    assert "worker_prefetch_multiplier=4" in result.message
    assert "144 tasks" in result.message  # 4 x 36 task threads
    assert "autoscaler" in result.message and "set it to 1" in result.message


def test_prefetch_zero_means_unlimited_and_fails() -> None:
    result = check_prefetch(0, task_threads=36)
    assert result.status is Status.FAIL
    assert "every waiting task" in result.message


def test_prefetch_of_one_passes() -> None:
    assert check_prefetch(1, task_threads=36).status is Status.OK


def test_task_events_off_warns_naming_both_settings() -> None:
    result = check_task_events(False, False)
    assert result.status is Status.WARN
    assert "worker_send_task_events and task_send_sent_event off" in result.message
    assert "Flower" in result.message


def test_task_events_half_on_warns_naming_the_missing_one() -> None:
    result = check_task_events(True, False)
    assert result.status is Status.WARN
    assert "task_send_sent_event" in result.message
    assert "worker_send_task_events" not in result.message


def test_task_events_on_passes() -> None:
    assert check_task_events(True, True).status is Status.OK


@pytest.mark.parametrize("never", [None, 0, timedelta(0)])
def test_results_that_never_expire_fail(never: Any) -> None:
    result = check_result_expiry(never)
    assert result.status is Status.FAIL
    assert "never expire" in result.message and "CAPTION_RESULT_EXPIRES_S" in result.message


def test_results_kept_a_month_warn_with_the_redis_cost() -> None:
    result = check_result_expiry(timedelta(days=30))
    assert result.status is Status.WARN
    assert "30 days" in result.message and "GB of Redis" in result.message


def test_a_day_of_results_passes() -> None:
    result = check_result_expiry(86_400)
    assert result == CheckResult("result expiry", Status.OK, "results expire after 1 day")


def test_celery_values_fall_back_to_celery_defaults() -> None:
    module = ModuleType("bare_celeryconfig")
    module.broker_url = "redis://r:6379/0"  # type: ignore[attr-defined]
    module.result_backend = "redis://r:6379/1"  # type: ignore[attr-defined]
    values = CeleryValues.from_module(module)
    assert values.broker_url == "redis://r:6379/0"
    # What Celery would run with: 4 per thread, no events, results kept a day.
    assert values.worker_prefetch_multiplier == 4
    assert values.worker_send_task_events is False
    assert values.result_expires == timedelta(days=1)


# --- result backend and S3 (the checks that fail before any socket) --------------------------


def test_a_non_redis_result_backend_fails_without_echoing_the_password() -> None:
    result = check_result_backend("amqp://user:s3cret@rabbit//", None, timeout_s=1)
    assert result.status is Status.FAIL
    assert "CAPTION_RESULT_BACKEND" in result.message
    assert "s3cret" not in result.message and "user:**@rabbit" in result.message


def test_an_object_uri_that_is_not_s3_fails_before_asking_the_store() -> None:
    result = check_object(None, "https://example.com/cat.jpg", (), max_image_bytes=10)
    assert result.status is Status.FAIL
    assert result.message.startswith("--object:") and "s3://bucket/key" in result.message


def test_an_object_outside_the_allowlist_fails_before_asking_the_store() -> None:
    result = check_object(None, "s3://elsewhere/cat.jpg", ("photos",), max_image_bytes=10)
    assert result.status is Status.FAIL
    assert "CAPTION_ALLOWED_BUCKETS" in result.message and "'elsewhere'" in result.message


# --- the model on disk -------------------------------------------------------------------------


def test_model_missing_from_the_cache_without_downloads_fails_naming_the_fix() -> None:
    files = ModelFiles(resolve_model("acme/captioner"), None)
    result = check_model(files, auto_download=False, cache_dir="/hf/hub")
    assert result.status is Status.FAIL
    assert "acme/captioner is not in the Hugging Face cache at /hf/hub" in result.message
    assert "CAPTION_AUTO_DOWNLOAD=false" in result.message
    assert "hf download acme/captioner" in result.message


def test_model_missing_from_the_cache_with_downloads_warns() -> None:
    files = ModelFiles(resolve_model("acme/captioner"), None)
    result = check_model(files, auto_download=True, cache_dir="/hf/hub")
    assert result.status is Status.WARN
    assert "downloads it at start" in result.message


def test_local_model_directory_without_config_fails(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    resolved = resolve_model(str(tmp_path))
    result = check_model(model_files_in(resolved, tmp_path), auto_download=False, cache_dir="")
    assert result.status is Status.FAIL
    assert "config.json" in result.message and "CAPTION_MODEL" in result.message


def test_sharded_model_names_the_missing_shard(tmp_path: Path) -> None:
    for name in ("config.json", "tokenizer_config.json", "model-1.safetensors"):
        (tmp_path / name).write_text("{}")
    index = {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    files = model_files_in(resolve_model(str(tmp_path)), tmp_path)
    assert files.missing == ("model-2.safetensors",)
    assert "model-2.safetensors" in check_model(files, False, "").message


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A safetensors file with the given header; the data is zeros (only sizes matter)."""
    sizes = {"BF16": 2, "F32": 4, "U8": 1}
    header: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n_bytes = sizes[dtype]
        for dim in shape:
            n_bytes *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n_bytes]}
        offset += n_bytes
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def test_footprint_of_a_uint4_layer_without_svd_comes_from_its_packed_bytes(
    tmp_path: Path,
) -> None:
    text = {"num_hidden_layers": 1, "num_key_value_heads": 1, "head_dim": 8}
    config = {"text_config": text, "quantization_config": {"quant_method": "sdnq"}}
    config["quantization_config"]["weights_dtype"] = "uint4"
    (tmp_path / "config.json").write_text(json.dumps(config))
    # One 64x32 linear layer: uint4 packs two weights a byte; 64 rows of fp32 scale.
    write_safetensors(
        tmp_path / "model.safetensors",
        {"proj.weight": ("U8", [1024]), "proj.scale": ("F32", [64, 1]), "norm": ("BF16", [32])},
    )
    settings = Settings(model=str(tmp_path), weights="bf16", dtype="bfloat16")
    estimate = estimate_footprint(tmp_path, [tmp_path / "model.safetensors"], settings)
    assert estimate.weights_bytes == 1024 + 64 * 4 + 32 * 2
    assert estimate.extra_bytes == 64 * 32 * 2 - (1024 + 64 * 4)  # dense bf16 minus stored
    assert estimate.quantized


# --- GPU ---------------------------------------------------------------------------------------


def test_no_gpu_warns_that_the_worker_runs_on_the_cpu() -> None:
    result = check_gpu(GpuProbe((), None), device=None)
    assert result.status is Status.WARN
    assert result.message.startswith("no GPU")
    assert (
        "the worker will run on the CPU" in result.message
        and "CAPTION_DEVICE=cpu" in result.message
    )


def test_no_gpu_is_fine_when_the_cpu_was_asked_for() -> None:
    assert check_gpu(None, device="cpu").status is Status.OK


def test_a_named_gpu_that_is_not_there_fails() -> None:
    assert check_gpu(GpuProbe((), CUDA), device="cuda").status is Status.FAIL
    result = check_gpu(GpuProbe((H200,), CUDA), device="cuda:3")
    assert result.status is Status.FAIL
    assert "CAPTION_DEVICE=cuda:3" in result.message and "1 GPU(s)" in result.message


def test_visible_gpus_are_listed_with_name_and_memory() -> None:
    result = check_gpu(GpuProbe((H200, SMALL), CUDA), device=None)
    assert result.status is Status.OK
    assert "cuda:0 NVIDIA H200, 139.0 GiB free of 140.0 GiB" in result.message
    assert "cuda:1 NVIDIA L4" in result.message


# --- does the weight form fit? -----------------------------------------------------------------


def test_weights_that_fit_pass_and_show_the_sums() -> None:
    result = check_weights_fit(GpuProbe((H200,), CUDA), footprint(20.1), Settings())
    assert result.status is Status.OK
    assert "CAPTION_WEIGHTS=sdnq needs about 20.1 GiB for weights" in result.message


def test_a_converted_form_too_big_for_the_gpu_fails_naming_the_alternatives() -> None:
    settings = Settings(weights="bf16")
    result = check_weights_fit(GpuProbe((SMALL,), CUDA), footprint(6.5, extra_gib=16), settings)
    assert result.status is Status.FAIL
    assert "refuse to start" in result.message and "CAPTION_WEIGHTS=int8" in result.message


def test_the_tightest_gpu_decides() -> None:
    probe = GpuProbe((H200, SMALL), CUDA)
    result = check_weights_fit(probe, footprint(23), Settings())
    assert result.status is Status.FAIL  # 23 GiB of weights > the L4's 22 GiB free
    assert "cuda:1 has 22.0 GiB free" in result.message
    pinned = check_weights_fit(probe, footprint(23), Settings(device="cuda:0"))
    assert pinned.status is Status.OK


def test_stored_weights_that_do_not_fit_fail_and_suggest_spreading() -> None:
    result = check_weights_fit(GpuProbe((SMALL,), CUDA), footprint(30), Settings())
    assert result.status is Status.FAIL
    assert "CAPTION_MEMORY_MODE=balanced or lowvram" in result.message


def test_stored_weights_with_little_room_left_warn_about_the_batch_size() -> None:
    settings = Settings(engine="generate")
    result = check_weights_fit(GpuProbe((SMALL,), CUDA), footprint(21, reserve_gib=2), settings)
    assert result.status is Status.WARN
    assert "CAPTION_MAX_BATCH" in result.message


def test_the_slot_engine_with_little_room_for_its_kv_cache_warns_about_slots() -> None:
    settings = Settings()  # the slot engine is the default
    result = check_weights_fit(GpuProbe((SMALL,), CUDA), footprint(21, reserve_gib=2), settings)
    assert result.status is Status.WARN
    assert "KV cache" in result.message and "CAPTION_SLOTS" in result.message


def test_a_plain_checkpoint_is_sized_without_a_weight_form() -> None:
    plain = Footprint(8 * GIB, 0, 2 * GIB, quantized=False)
    result = check_weights_fit(GpuProbe((SMALL,), CUDA), plain, Settings(weights="bf16"))
    assert result.status is Status.OK
    assert result.message.startswith("the model needs about 8.0 GiB for weights")


def test_spilling_memory_modes_warn_instead_of_failing() -> None:
    settings = Settings(memory_mode="balanced")
    result = check_weights_fit(GpuProbe((SMALL,), CUDA), footprint(30), settings)
    assert result.status is Status.WARN and "CPU RAM" in result.message


def test_weights_fit_is_skipped_without_a_gpu_or_without_files() -> None:
    assert check_weights_fit(None, footprint(1), Settings(device="cpu")).status is Status.SKIP
    assert check_weights_fit(GpuProbe((), None), footprint(1), Settings()).status is Status.SKIP
    reason = "the model's files are not on this machine"
    skipped = check_weights_fit(GpuProbe((H200,), CUDA), reason, Settings())
    assert skipped == CheckResult("weights fit", Status.SKIP, reason)


# --- formatting and the exit code --------------------------------------------------------------


RESULTS = [
    CheckResult("broker", Status.OK, "redis://r:6379/0 answered in 2 ms"),
    CheckResult("visibility timeout", Status.FAIL, "too short"),
    CheckResult("gpu", Status.WARN, "no GPU"),
]


def test_text_report_is_one_aligned_line_per_check() -> None:
    assert format_text(RESULTS).splitlines() == [
        "OK    broker              redis://r:6379/0 answered in 2 ms",
        "FAIL  visibility timeout  too short",
        "WARN  gpu                 no GPU",
    ]


def test_json_report_is_a_list_of_check_status_message() -> None:
    assert json.loads(format_json(RESULTS))[1] == {
        "check": "visibility timeout",
        "status": "FAIL",
        "message": "too short",
    }


def test_exit_code_is_one_only_when_something_failed() -> None:
    assert exit_code(RESULTS) == 1
    assert exit_code([r for r in RESULTS if r.status is not Status.FAIL]) == 0
