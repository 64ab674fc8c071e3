"""``caption-worker worker``'s plan: one Celery worker process per GPU, or one on the CPU."""

from __future__ import annotations

import sys

import pytest

from worker.queue.launcher import plan_workers, visible_gpus, worker_command


def test_one_process_per_gpu_each_seeing_only_its_own() -> None:
    plans = plan_workers(["0", "3"], "captions", "INFO")
    assert [p.env for p in plans] == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "3"}]
    assert [p.command for p in plans] == [
        worker_command("captions", "gpu0@%h", "INFO"),
        worker_command("captions", "gpu3@%h", "INFO"),
    ]
    assert plans[0].shell().startswith("CUDA_VISIBLE_DEVICES=0 ")
    assert "--hostname gpu3@%h" in plans[1].shell()


def test_no_gpu_means_one_cpu_process_that_sees_none() -> None:
    [plan] = plan_workers([], "thumbs", "DEBUG")
    assert plan.env == {"CUDA_VISIBLE_DEVICES": ""}
    assert plan.command == worker_command("thumbs", "cpu@%h", "DEBUG")


def test_the_worker_command_runs_the_caption_app_on_the_queue() -> None:
    command = worker_command("thumbs", "gpu1@%h", "WARNING")
    assert command[:6] == [sys.executable, "-m", "celery", "-A", "worker.app", "worker"]
    for flag, value in (
        ("--queues", "thumbs"),
        ("--hostname", "gpu1@%h"),
        ("--loglevel", "WARNING"),
    ):
        assert command[command.index(flag) + 1] == value
    assert "--without-gossip" in command and "--without-mingle" in command


@pytest.mark.parametrize(
    ("value", "gpus"), [("0,1", ["0", "1"]), (" 2 , 5 ", ["2", "5"]), ("", []), ("-1", [])]
)
def test_cuda_visible_devices_decides_the_gpus(
    monkeypatch: pytest.MonkeyPatch, value: str, gpus: list[str]
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert visible_gpus() == gpus


def test_each_gpu_process_gets_its_own_metrics_port_and_ready_file() -> None:
    plans = plan_workers(
        ["0", "3", "5"], "captions", "INFO", metrics_port=9330, ready_file="/run/caption.ready"
    )
    assert [p.env["CAPTION_METRICS_PORT"] for p in plans] == ["9330", "9331", "9332"]
    assert [p.env["CAPTION_READY_FILE"] for p in plans] == [
        "/run/caption.ready.gpu0",
        "/run/caption.ready.gpu3",
        "/run/caption.ready.gpu5",
    ]
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["0", "3", "5"]
    assert "CAPTION_METRICS_PORT=9331 " in plans[1].shell()


def test_the_cpu_process_gets_the_base_port_and_a_cpu_ready_file() -> None:
    [plan] = plan_workers([], "captions", "INFO", metrics_port=9400, ready_file="/tmp/ready")
    assert plan.env == {
        "CUDA_VISIBLE_DEVICES": "",
        "CAPTION_METRICS_PORT": "9400",
        "CAPTION_READY_FILE": "/tmp/ready.cpu",
    }


def test_port_zero_and_no_ready_file_leave_the_environment_alone() -> None:
    # 0 (off) is inherited by every process as it is; no ready file means none to suffix.
    plans = plan_workers(["0", "1"], "captions", "INFO", metrics_port=0, ready_file=None)
    assert [p.env for p in plans] == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]


def test_workers_consume_their_queue_then_the_bulk_queue() -> None:
    [plan] = plan_workers([], "captions", "INFO", bulk_queue="captions-bulk")
    command = plan.command
    assert command[command.index("--queues") + 1] == "captions,captions-bulk"
    # No bulk queue, or the bulk lane's own deployment (its queue is the bulk queue): one.
    for queue, bulk in (("captions", ""), ("captions-bulk", "captions-bulk")):
        command = worker_command(queue, "cpu@%h", "INFO", bulk)
        assert command[command.index("--queues") + 1] == queue
