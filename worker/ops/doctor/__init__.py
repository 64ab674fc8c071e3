"""``caption-worker doctor``: a pre-flight check of a host before workers start on it.

Each check is a small function that takes the values it judges and returns a
``CheckResult``: a status word, the check's name and one sentence that says what is wrong
and how to fix it. ``run_checks`` gathers those values (sockets, S3, the Hugging Face cache,
torch) and calls the checks; ``diagnose`` does the same from the environment and
``celeryconfig``; ``format_text`` and ``format_json`` only format. Nothing here loads the
model or downloads a file, and every network call is bounded by ``DoctorOptions.timeout_s``
so an unreachable service costs seconds, not minutes.

Modules: ``report`` (statuses, lines, output, exit code), ``inputs`` (options and Celery
values), ``services`` (broker, result backend), ``storage`` (S3), ``config`` (Celery
settings), ``model`` (the model's files), ``gpu`` (GPUs and whether the weights fit),
``background`` (deadline-bounded threads) and ``runner`` (``run_checks``, ``diagnose``).
The weight estimate is ``worker.engine.footprint``'s.
"""

from worker.ops.doctor.config import (
    check_prefetch,
    check_result_expiry,
    check_task_events,
    check_visibility_timeout,
)
from worker.ops.doctor.gpu import Gpu, GpuProbe, check_gpu, check_weights_fit, probe_gpus
from worker.ops.doctor.inputs import CeleryValues, DoctorOptions
from worker.ops.doctor.model import ModelFiles, check_model, find_model_files, model_files_in
from worker.ops.doctor.report import GIB, CheckResult, Status, exit_code, format_json, format_text
from worker.ops.doctor.runner import diagnose, run_checks
from worker.ops.doctor.services import check_broker, check_result_backend
from worker.ops.doctor.storage import check_bucket, check_object, s3_checks, s3_client

__all__ = [
    "GIB",
    "CeleryValues",
    "CheckResult",
    "DoctorOptions",
    "Gpu",
    "GpuProbe",
    "ModelFiles",
    "Status",
    "check_broker",
    "check_bucket",
    "check_gpu",
    "check_model",
    "check_object",
    "check_prefetch",
    "check_result_backend",
    "check_result_expiry",
    "check_task_events",
    "check_visibility_timeout",
    "check_weights_fit",
    "diagnose",
    "exit_code",
    "find_model_files",
    "format_json",
    "format_text",
    "model_files_in",
    "probe_gpus",
    "run_checks",
    "s3_checks",
    "s3_client",
]
