"""``caption-worker demo``: the whole product on one machine, in one command.

Whatever is not configured is provided locally: a tiny random SDNQ model when
``CAPTION_MODEL`` is unset, and a loopback S3 server when no S3 endpoint is set. Redis
comes from ``CAPTION_BROKER_URL`` (a local Redis by default); when nothing answers there and
``redis-server`` is installed, a private one starts on a free port. The demo uploads an image,
starts a real worker process, enqueues a caption task, prints the result and stops.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

from worker.settings import load_settings

DEMO_BUCKET = "caption-demo"


def sample_image() -> bytes:
    """A small synthetic picture: sky, sun, grass."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (320, 240), (120, 180, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 170, 320, 240), fill=(60, 160, 70))
    draw.ellipse((230, 30, 290, 90), fill=(250, 220, 60))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def run_demo(image: Path | None) -> dict[str, Any]:
    """Upload, enqueue, caption with a real worker process, and return the result."""
    from worker.client import CaptionClient
    from worker.devtools.loopback import LoopbackS3
    from worker.devtools.processes import WorkerProcess
    from worker.devtools.redis_server import reachable_redis

    settings = load_settings()
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="caption-demo-")))
        env: dict[str, str] = {
            "SDNQ_USE_TORCH_COMPILE": os.environ.get("SDNQ_USE_TORCH_COMPILE", "0")
        }
        broker = reachable_redis(settings.broker_url, stack, workdir / "redis")
        if broker != settings.broker_url:
            env |= {"CAPTION_BROKER_URL": broker, "CAPTION_RESULT_BACKEND": broker}
            settings = settings.model_copy(update={"broker_url": broker, "result_backend": broker})
        if "CAPTION_MODEL" not in os.environ:
            from worker.devtools.tiny_model import build_tiny_model

            print(
                "CAPTION_MODEL is unset: building a tiny random SDNQ model (gibberish captions)",
                file=sys.stderr,
            )
            env |= {
                "CAPTION_MODEL": str(build_tiny_model(workdir / "tiny-model")),
                "CAPTION_DTYPE": "float32",
                "CAPTION_AUTO_DOWNLOAD": "false",
            }
        if os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"):
            import boto3

            s3 = boto3.client("s3")
        else:
            print("no S3 endpoint configured: starting a loopback S3 server", file=sys.stderr)
            loopback = stack.enter_context(LoopbackS3(workdir / "s3.log"))
            s3 = loopback.client()
            env |= loopback.env()
        with suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=DEMO_BUCKET)
        key = image.name if image else "sample.png"
        s3.put_object(
            Bucket=DEMO_BUCKET, Key=key, Body=image.read_bytes() if image else sample_image()
        )
        uri = f"s3://{DEMO_BUCKET}/{key}"
        print(
            f"uploaded {uri}; starting a worker (the model loads once, before any task)",
            file=sys.stderr,
        )
        stack.enter_context(WorkerProcess(env, workdir / "worker.log", node="demo@%h"))
        client = CaptionClient(settings)
        stack.callback(client.close)
        started = time.monotonic()
        task_id = client.submit(uri, max_new_tokens=32)
        print(f"enqueued task {task_id}", file=sys.stderr)
        result = client.result(task_id, timeout=300)
        print(
            f"captioned in {time.monotonic() - started:.2f}s by {result['worker']}", file=sys.stderr
        )
        return {"task_id": task_id, **result}
