"""What each entry point imports, each checked in a fresh interpreter.

The production path (``celery -A worker.app``, ``caption-worker worker``) never imports the
development tools; ``import worker`` imports neither torch nor Celery; the tiny-model tools
import no model library until they build one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPORT = """
import json, sys
def loaded(*prefixes):
    return sorted(m for m in sys.modules if m.split(".")[0] in prefixes or m.startswith(prefixes))
"""


def run(code: str) -> dict[str, list[str]]:
    """Run ``code`` (after REPORT) in a fresh interpreter; the JSON it prints last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTION_")}
    env.update(CUDA_VISIBLE_DEVICES="", SDNQ_USE_TORCH_COMPILE="0")
    out = subprocess.run(
        [sys.executable, "-c", REPORT + code],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report: dict[str, list[str]] = json.loads(out.stdout.strip().splitlines()[-1])
    return report


def test_import_worker_loads_neither_torch_nor_celery() -> None:
    report = run("import worker\nprint(json.dumps({'heavy': loaded('torch', 'celery')}))")
    assert report["heavy"] == []


def test_the_celery_app_imports_no_dev_tools() -> None:
    report = run(
        "import worker.app\n"
        "assert worker.app.app.tasks['caption']\n"
        "print(json.dumps({'dev': loaded('worker.devtools')}))"
    )
    assert report["dev"] == []


def test_the_worker_command_imports_no_dev_tools() -> None:
    report = run(
        "import worker.cli\n"
        "sys.argv = ['caption-worker', 'worker', '--dry-run']\n"
        "try:\n"
        "    worker.cli.main()\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
        "print(json.dumps({'dev': loaded('worker.devtools')}))"
    )
    assert report["dev"] == []


@pytest.mark.parametrize(
    "modules",
    ["worker.devtools.tiny_model, worker.devtools.tiny_processor", "worker.devtools.shapes"],
)
def test_model_building_tools_import_no_model_library(modules: str) -> None:
    report = run(
        f"import {modules}\nprint(json.dumps({{'heavy': loaded('torch', 'transformers', 'sdnq')}}))"
    )
    assert report["heavy"] == []
