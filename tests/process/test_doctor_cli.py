"""``caption-worker doctor`` run as an operator runs it: one line per problem, a non-zero exit,
and an answer in seconds even when a service is down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from worker.devtools.loopback import free_port

CLI = str(Path(sys.executable).with_name("caption-worker"))
#: Seconds a doctor run may take on a loaded 2-core machine (torch import included).
FAST_S = 20.0


def doctor(
    *args: str, env: dict[str, str], hf_home: Path
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``caption-worker doctor`` with ``env`` over this environment; HF_HOME is empty."""
    started = time.monotonic()
    out = subprocess.run(
        [CLI, "doctor", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HF_HOME": str(hf_home), **env},
    )
    return out, time.monotonic() - started


def failures(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("FAIL")]


@pytest.fixture()
def services(redis_url: str) -> dict[str, str]:
    """Broker and result backend on the machine's Redis."""
    return {"CAPTION_BROKER_URL": f"{redis_url}/0", "CAPTION_RESULT_BACKEND": f"{redis_url}/0"}


def test_an_unreachable_broker_is_one_failed_line(services: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    env = {**services, "CAPTION_BROKER_URL": f"redis://:hunter2@127.0.0.1:{port}/0"}
    out, seconds = doctor(env=env, hf_home=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    [line] = failures(out.stdout)
    assert line.split()[:2] == ["FAIL", "broker"]
    assert f"127.0.0.1:{port}" in line and "Connection refused" in line
    assert "CAPTION_BROKER_URL" in line
    assert "hunter2" not in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert seconds < FAST_S


def test_a_visibility_timeout_below_the_deadline_is_one_failed_line(
    services: dict[str, str], tmp_path: Path
) -> None:
    env = {**services, "CAPTION_VISIBILITY_TIMEOUT_S": "300", "CAPTION_TASK_DEADLINE_S": "600"}
    out, seconds = doctor(env=env, hf_home=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    [line] = failures(out.stdout)
    assert line.split()[:3] == ["FAIL", "visibility", "timeout"]
    assert "CAPTION_VISIBILITY_TIMEOUT_S=300 must exceed" in line
    assert seconds < FAST_S


def test_a_model_missing_from_the_cache_without_downloads_is_one_failed_line(
    services: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **services,
        "CAPTION_MODEL": "acme/not-cached-anywhere",
        "CAPTION_AUTO_DOWNLOAD": "false",
    }
    out, seconds = doctor(env=env, hf_home=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    [line] = failures(out.stdout)
    assert line.split()[:2] == ["FAIL", "model"]
    assert "acme/not-cached-anywhere is not in the Hugging Face cache" in line
    assert str(tmp_path) in line and "CAPTION_AUTO_DOWNLOAD=false" in line
    assert seconds < FAST_S


def test_a_good_configuration_exits_zero_and_json_lists_every_check(
    services: dict[str, str], tmp_path: Path, tiny_model_dir: Path
) -> None:
    env = {
        **services,
        "CAPTION_MODEL": str(tiny_model_dir),
        "CAPTION_AUTO_DOWNLOAD": "false",
        "CAPTION_DEVICE": "cpu",
    }
    out, _ = doctor("--json", env=env, hf_home=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    statuses = {entry["check"]: entry["status"] for entry in report}
    # The project's own celeryconfig.py passes its checks.
    for check in ("broker", "result backend", "prefetch", "result expiry", "model", "gpu"):
        assert statuses[check] == "OK", report
    assert set(report[0]) == {"check", "status", "message"}


def test_an_invalid_setting_is_one_failed_line_naming_it(tmp_path: Path) -> None:
    out, _ = doctor(env={"CAPTION_MAX_BATCH": "lots"}, hf_home=tmp_path)
    assert out.returncode == 1
    [line] = out.stdout.splitlines()
    assert line.startswith("FAIL  settings") and "CAPTION_MAX_BATCH" in line
