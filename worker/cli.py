"""``caption-worker``: run workers, submit tasks, caption locally, benchmark, demo."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from worker.cli_bulk import bulk_app
from worker.cli_output import fail as _fail
from worker.cli_output import print_json as _print_json
from worker.errors import CaptionError
from worker.settings import load_settings

app = typer.Typer(
    help="Caption images in S3 with SDNQ-quantized Qwen3-VL on Celery workers.",
    no_args_is_help=True,
    add_completion=False,
)


app.add_typer(bulk_app, name="bulk")


@app.command()
def worker(
    gpus: Annotated[
        str | None, typer.Option(help="Comma-separated GPU indices (default: all visible).")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the worker commands and exit.")] = False,
) -> None:
    """Start one Celery worker process per visible GPU (or one CPU worker)."""
    from worker.queue.launcher import plan_workers, run_workers, visible_gpus

    try:
        settings = load_settings()
        settings.check_visibility_timeout()
    except CaptionError as exc:
        raise _fail(exc, 2) from None
    devices = [g for g in gpus.split(",") if g] if gpus is not None else visible_gpus()
    plans = plan_workers(
        devices,
        settings.queue,
        settings.log_level,
        metrics_port=settings.metrics_port,
        ready_file=settings.ready_file,
        bulk_queue=settings.bulk_queue,
    )
    if dry_run:
        for plan in plans:
            typer.echo(plan.shell())
        return
    raise typer.Exit(run_workers(plans))


@app.command()
def submit(
    image: Annotated[str, typer.Argument(help="s3://bucket/key of the image.")],
    prompt: Annotated[str | None, typer.Option(help="Instruction for the model.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Caption length cap.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the caption and print it.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 600,
) -> None:
    """Enqueue a caption task; print its id, or its result with --wait."""
    from worker.client import CaptionClient

    options: dict[str, Any] = {}
    if prompt is not None:
        options["prompt"] = prompt
    if max_new_tokens is not None:
        options["max_new_tokens"] = max_new_tokens
    client = CaptionClient(load_settings())
    try:
        task_id = client.submit(image, **options)
        if not wait:
            typer.echo(task_id)
            return
        _print_json({"id": task_id, **client.result(task_id, timeout=timeout)})
    except Exception as exc:
        raise _fail(exc) from None
    finally:
        client.close()


@app.command()
def status(task_id: str) -> None:
    """Print a task's state (QUEUED, STARTED, SUCCESS, FAILURE, UNKNOWN, ...)."""
    from dataclasses import asdict

    from worker.client import CaptionClient

    client = CaptionClient(load_settings())
    try:
        _print_json(asdict(client.status(task_id)))
    finally:
        client.close()


@app.command()
def result(
    task_id: str,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the caption.")] = 600,
) -> None:
    """Wait for a task's caption and print the result JSON (or its typed error)."""
    from worker.client import CaptionClient

    client = CaptionClient(load_settings())
    try:
        _print_json({"id": task_id, **client.result(task_id, timeout=timeout)})
    except Exception as exc:
        raise _fail(exc) from None
    finally:
        client.close()


@app.command()
def caption(
    source: Annotated[str, typer.Argument(help="A local image file or s3://bucket/key.")],
    prompt: Annotated[str | None, typer.Option(help="Instruction for the model.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Caption length cap.")] = 512,
) -> None:
    """Caption one image in this process, with no broker: try a model locally."""
    from worker.runtime.local import caption_locally

    try:
        _print_json(caption_locally(load_settings(), source, prompt, max_new_tokens).to_json())
    except CaptionError as exc:
        raise _fail(exc) from None


@app.command()
def models() -> None:
    """List the model catalogue; the worker serves the text-output entries."""
    from worker.engine.catalogue import CATALOGUE

    for entry in sorted(CATALOGUE, key=lambda e: -e.priority):
        mark = "serves" if entry.output_type == "text" else "refuses"
        typer.echo(
            f"{entry.name}\n  repo {entry.repo_id}  output {entry.output_type} ({mark})  "
            f"quant {entry.quant_level}  priority {entry.priority}\n  {entry.description}"
        )


@app.command()
def doctor(
    object_uri: Annotated[
        str | None,
        typer.Option("--object", help="s3://bucket/key the worker must be able to read."),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print a JSON list of {check, status, message}.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds each network check may take.")
    ] = 3.0,
) -> None:
    """Check this host before starting workers: broker, results, S3, model, GPU, settings.

    One line per check (OK, WARN, FAIL or SKIP); exits 1 if any check FAILs.
    """
    from worker.ops.doctor import DoctorOptions, diagnose, exit_code, format_json, format_text

    results = diagnose(DoctorOptions(object_uri, timeout))
    typer.echo(format_json(results) if json_output else format_text(results))
    raise typer.Exit(exit_code(results))


@app.command()
def exporter(
    queue: Annotated[
        list[str] | None,
        typer.Option(
            "--queue",
            metavar="NAME",
            help="Queue to report; repeat for more (default CAPTION_QUEUE).",
        ),
    ] = None,
    port: Annotated[int, typer.Option(min=1, max=65_535, help="Port of /metrics.")] = 9640,
    sample: Annotated[
        int, typer.Option(min=1, help="Waiting messages costed per queue and scrape.")
    ] = 1_000,
    tokens_per_second: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="One worker's generated tokens/s while no worker reports one "
            "(default 100; see docs/exporter.md).",
        ),
    ] = None,
) -> None:
    """Serve queue depth and queued GPU work for autoscaling on /metrics (one per deployment).

    Reads the Redis broker (CAPTION_BROKER_URL) at every scrape, and the bulk runs recorded
    in the result backend (a bulk queue's work is its runs' remaining items).
    """
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from worker.bulk.state import redis_for
    from worker.bulk.work import BulkRunsSource
    from worker.ops.exporter import (
        DEFAULT_TOKENS_PER_SECOND,
        REDIS_TIMEOUT_S,
        ExporterOptions,
        TokenPolicy,
        run_exporter,
    )
    from worker.storage.redis_client import is_redis_url

    try:
        settings = load_settings()
        # Bulk runs' remaining items, read from the result backend where runs are recorded
        # (with the broker client's short timeouts and no retries inside a scrape).
        sources: tuple[BulkRunsSource, ...] = ()
        if is_redis_url(settings.result_backend):
            client = redis_for(settings, REDIS_TIMEOUT_S, retry=Retry(NoBackoff(), 0))
            sources = (BulkRunsSource(client, TokenPolicy.from_settings(settings).default),)
        options = ExporterOptions(
            queues=tuple(dict.fromkeys(queue or [settings.queue])),
            port=port,
            sample=sample,
            tokens_per_second=tokens_per_second or DEFAULT_TOKENS_PER_SECOND,
            sources=sources,
        )
        raise typer.Exit(run_exporter(settings, options))
    except CaptionError as exc:  # settings, a broker that is not Redis, a taken port
        raise _fail(exc, 2) from None


@app.command("tiny-model")
def tiny_model(
    directory: Annotated[Path, typer.Argument(help="Where to write the model.")],
    seed: Annotated[int, typer.Option(help="Random seed for the weights.")] = 0,
) -> None:
    """Write a tiny random SDNQ Qwen3-VL that loads like a hub repo (smoke tests)."""
    os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")
    from worker.devtools.tiny_model import build_tiny_model

    typer.echo(str(build_tiny_model(directory, seed=seed)))


@app.command()
def demo(
    image: Annotated[
        Path | None, typer.Option(help="Image to caption (default: a generated one).")
    ] = None,
) -> None:
    """End to end on this machine: S3 + worker + tiny model unless configured otherwise."""
    from worker.devtools.demo import run_demo

    try:
        _print_json(run_demo(image))
    except CaptionError as exc:
        raise _fail(exc) from None


@app.command()
def bench(
    mode: Annotated[
        str,
        typer.Option(
            help="engine, path, all, or soak (Redis keys and worker memory over --tasks)."
        ),
    ] = "all",
    tasks: Annotated[int, typer.Option(help="Images per measurement.")] = 32,
    max_batch: Annotated[int, typer.Option(help="Batch size for the batched runs.")] = 32,
    new_tokens: Annotated[int, typer.Option(help="Generated tokens per image (fixed).")] = 128,
    image_px: Annotated[int, typer.Option(help="Side of the square test images.")] = 256,
    random_shape: Annotated[
        str | None,
        typer.Option(help="4b, 8b, 32b (GPU) or tiny-test: random weights of that shape."),
    ] = None,
    engine: Annotated[str, typer.Option(help="slots or generate.")] = "slots",
    weights: Annotated[str, typer.Option(help="sdnq, bf16 or int8.")] = "sdnq",
    mixed: Annotated[
        bool, typer.Option(help="Caption lengths cycle through 1/8, 1/4, 1/2, 1 of --new-tokens.")
    ] = False,
    models_dir: Annotated[
        Path | None, typer.Option(help="Keep the benchmark model here; reuse it when present.")
    ] = None,
    json_out: Annotated[Path | None, typer.Option(help="Also write the figures here.")] = None,
    single: Annotated[
        bool, typer.Option(help="Also measure one image at a time (the batching speedup).")
    ] = True,
) -> None:
    """Measure images/s one-at-a-time against batched, engine-only and through the queue."""
    from worker.devtools.bench import BenchConfig, run_bench

    config = BenchConfig(
        mode,
        tasks,
        max_batch,
        new_tokens,
        image_px,
        random_shape,
        engine,
        weights,
        mixed,
        models_dir,
        single,
    )
    try:
        report = run_bench(config)
    except CaptionError as exc:  # a refused configuration or model: one line, not a traceback
        raise _fail(exc, 2) from None
    _print_json(report)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2))


def main() -> None:
    """Console-script entry point."""
    app(prog_name="caption-worker")


if __name__ == "__main__":
    main()
