"""``caption-worker bulk``: submit, watch, resume, cancel, report and list bulk runs.

Each command parses its arguments and calls ``worker.bulk`` (``plan``, ``control``,
``status``, ``progress``, ``report``); failures print one ``error:`` line and exit 2 when
the command or its input must change, 1 when trying again may help.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from worker.cli_output import fail
from worker.errors import CaptionError
from worker.settings import Settings, load_settings

bulk_app = typer.Typer(
    help="Bulk runs: caption every image under an S3 prefix or in a manifest (docs/bulk.md).",
    no_args_is_help=True,
)

RunArgument = Annotated[str, typer.Argument(help="The run id, or the run's s3:// directory.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def _code(exc: BaseException) -> int:
    return 1 if not isinstance(exc, CaptionError) or exc.retryable else 2


@contextmanager
def _guarded() -> Iterator[None]:
    """Turn any failure into one ``error:`` line and its exit code."""
    try:
        yield
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as exc:  # Redis or the broker unreachable included
        raise fail(exc, _code(exc)) from None


@contextmanager
def _ledger(settings: Settings) -> Iterator[Any]:
    from worker.bulk.state import RunState, redis_for

    client = redis_for(settings)
    try:
        yield RunState(client)
    finally:
        client.close()


def _s3(settings: Settings) -> Any:
    from worker.storage.s3 import s3_client

    return s3_client(settings)


@bulk_app.command("submit")
def bulk_submit(
    source: Annotated[
        str,
        typer.Argument(
            help="s3://bucket/prefix/, or a .txt / .jsonl manifest (local path or s3://)."
        ),
    ],
    out: Annotated[str, typer.Option(help="s3://bucket/prefix: runs go beneath it.")],
    include: Annotated[
        list[str] | None,
        typer.Option(
            metavar="GLOB",
            help="Keys to take, relative to the prefix; repeat (default: image extensions).",
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(metavar="GLOB", help="Keys to leave out; repeat.")
    ] = None,
    prompt: Annotated[str | None, typer.Option(help="Instruction for the model.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Caption length cap.")] = None,
    do_sample: Annotated[bool, typer.Option(help="Sample instead of greedy.")] = False,
    temperature: Annotated[float | None, typer.Option(help="With --do-sample.")] = None,
    top_p: Annotated[float | None, typer.Option(help="With --do-sample.")] = None,
    top_k: Annotated[int | None, typer.Option(help="With --do-sample.")] = None,
    repetition_penalty: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option(help="With --do-sample.")] = None,
    max_pixels: Annotated[int | None, typer.Option(help="Pixel budget per image.")] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="Items per shard.")] = 1_000,
    sidecars: Annotated[
        str, typer.Option(help="none, next-to-image or s3://bucket/prefix.")
    ] = "none",
    if_exists: Annotated[
        str, typer.Option(help="skip (what earlier runs captioned) or overwrite.")
    ] = "skip",
    queue: Annotated[str, typer.Option(help="Queue of the shard tasks.")] = "captions-bulk",
    window: Annotated[
        int, typer.Option(min=1, help="Shard messages queued at once (the fleet sends the rest).")
    ] = 16,
    dry_run: Annotated[bool, typer.Option(help="Plan and count; write nothing.")] = False,
    wait: Annotated[
        bool,
        typer.Option(help="Draw the run's progress until it ends (stopping it loses nothing)."),
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Plan a bulk run and start it.

    List the source, skip what is done, write inputs/ and run.json, then queue the first
    --window shards; workers run the rest.

    Prints the run id, or one JSON object with --json.
    """
    from worker.bulk.plan import BulkOptions

    arguments = {
        "prompt": prompt,
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample or None,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "repetition_penalty": repetition_penalty,
        "seed": seed,
        "max_pixels": max_pixels,
    }
    options = BulkOptions(
        source=source,
        out=out,
        include=tuple(include) if include else None,
        exclude=tuple(exclude or ()),
        arguments={name: value for name, value in arguments.items() if value is not None},
        shard_size=shard_size,
        sidecars=sidecars,
        if_exists=if_exists,
        queue=queue,
        argv=("caption-worker", *sys.argv[1:]),
        dry_run=dry_run,
    )
    with _guarded():  # refused or failed: nothing enqueued
        settings = load_settings()
        summary = _plan(settings, options, queue)
    report = summary.to_json()
    if not dry_run:
        try:
            report["enqueued"] = _start(settings, summary, queue, window)
        except Exception as exc:
            typer.echo(
                f"error: {type(exc).__name__}: {exc}; the run is planned at {summary.output} "
                f"but was not started: `caption-worker bulk resume {summary.output}` starts it",
                err=True,
            )
            raise typer.Exit(1) from None
        if wait:  # the run id first, so a killed --wait still leaves it on the terminal
            typer.echo(f"run {summary.run_id}: {summary.output}", err=True)
            with _guarded():
                _watch(settings, summary.output)
    if json_output:
        typer.echo(json.dumps(report, ensure_ascii=False))
    elif dry_run:
        for name, value in report.items():
            typer.echo(f"{name}: {value}")
    else:
        typer.echo(summary.run_id)


def _plan(settings: Settings, options: Any, queue: str) -> Any:
    """Plan the run; a real one is recorded as ``planning`` while its listing runs (and
    forgotten again if planning fails)."""
    from worker.bulk.plan import plan_run

    if options.dry_run:
        return plan_run(settings, options)
    with _ledger(settings) as ledger:
        begun: list[str] = []

        def record(layout: Any) -> None:
            ledger.begin(layout.run_id, output=layout.uri, queue=queue)
            begun.append(layout.run_id)

        try:
            return plan_run(settings, options, on_start=record)
        except BaseException:
            for run_id in begun:
                ledger.forget(run_id)
            raise


def _start(settings: Settings, summary: Any, queue: str, window: int) -> int:
    from worker.bulk.control import ShardSender, start_run
    from worker.bulk.runfiles import RunFiles, layout_of

    files = RunFiles(_s3(settings), layout_of(summary.output))
    with _ledger(settings) as ledger, ShardSender.for_broker(settings.broker_url) as sender:
        return start_run(
            ledger,
            files,
            sender,
            counts=summary.counts,
            max_new_tokens=summary.max_new_tokens,
            queue=queue,
            window=window,
        )


def _watch(settings: Settings, run: str, interval_s: float = 2.0) -> dict[str, Any]:
    """Draw the run's progress on stderr until it ends; Ctrl-C exits 130, the run goes on."""
    from worker.bulk.progress import watch
    from worker.bulk.status import run_status

    s3 = _s3(settings)
    with _ledger(settings) as ledger:
        poll: Callable[[], dict[str, Any]] = lambda: run_status(  # noqa: E731
            settings, run, ledger.client, s3
        )
        try:
            return watch(poll, sys.stderr, interval_s=interval_s)
        except KeyboardInterrupt:
            typer.echo("stopped watching; the run goes on", err=True)
            raise typer.Exit(130) from None


@bulk_app.command("status")
def bulk_status(
    run: RunArgument,
    watch_: Annotated[
        bool, typer.Option("--watch", help="Draw a live progress bar until the run ends.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Where a run stands: counts, rate and ETA from Redis, or from S3 when Redis has none."""
    from worker.bulk.status import STATUS_FIELDS, run_status

    with _guarded():
        settings = load_settings()
        if watch_:
            status = _watch(settings, run)
        else:
            with _ledger(settings) as ledger:
                status = run_status(settings, run, ledger.client, _s3(settings))
    if json_output:
        typer.echo(json.dumps(status, ensure_ascii=False))
        return
    for name in (*STATUS_FIELDS, *(k for k in status if k not in STATUS_FIELDS)):
        typer.echo(f"{name}: {status.get(name)}")


@bulk_app.command("resume")
def bulk_resume(
    run: RunArgument,
    retry_failed: Annotated[
        bool, typer.Option(help="Also caption the run's failed items again, into the same run.")
    ] = False,
    window: Annotated[
        int, typer.Option(min=1, help="Shard messages queued at once, for a run rebuilt from S3.")
    ] = 16,
    json_output: JsonOption = False,
) -> None:
    """Queue again the shards neither done nor held by a live worker.

    With the run's s3:// URI, a run Redis lost is first rebuilt from its files.
    """
    from worker.bulk.control import ShardSender, resume_run

    with _guarded():
        settings = load_settings()
        with _ledger(settings) as ledger, ShardSender.for_broker(settings.broker_url) as sender:
            result = resume_run(
                run, ledger, _s3(settings), sender, retry_failed=retry_failed, window=window
            )
    if json_output:
        typer.echo(json.dumps(result.to_json()))
        return
    for name, value in result.to_json().items():
        typer.echo(f"{name}: {value}")


@bulk_app.command("cancel")
def bulk_cancel(run: RunArgument) -> None:
    """Stop a run; `bulk resume` continues it.

    Queued shards are dropped as workers take them; running ones stop at their next item
    after a checkpoint.
    """
    from worker.bulk.control import cancel_run

    with _guarded(), _ledger(load_settings()) as ledger:
        state = cancel_run(run, ledger)
    typer.echo(f"state: {state}")


@bulk_app.command("report")
def bulk_report(run: RunArgument, json_output: JsonOption = False) -> None:
    """What a run produced: counts, errors by type with examples, finish reasons.

    Read from the run's outputs in S3.
    """
    from worker.bulk.report import build_report, format_report
    from worker.bulk.runfiles import RunFiles, layout_of
    from worker.bulk.status import resolve_run

    with _guarded():
        settings = load_settings()
        run_id, layout = resolve_run(run)
        if layout is None:
            with _ledger(settings) as ledger:
                record = ledger.snapshot(run_id)
            if record is None:
                from worker.bulk.errors import SourceNotFound

                raise SourceNotFound(
                    f"Redis has no record of run {run_id}; give the run's s3:// URI"
                )
            layout = layout_of(str(record["output"]))
        report = build_report(RunFiles(_s3(settings), layout))
    if json_output:
        typer.echo(json.dumps(report, ensure_ascii=False))
    else:
        typer.echo(format_report(report))


@bulk_app.command("list")
def bulk_list(json_output: JsonOption = False) -> None:
    """The runs this Redis knows, newest first."""
    from worker.bulk.control import list_runs

    with _guarded(), _ledger(load_settings()) as ledger:
        runs = list_runs(ledger)
    if json_output:
        typer.echo(json.dumps(runs, ensure_ascii=False))
        return
    typer.echo(f"{'RUN':22}  {'STATE':9}  {'DONE':>9}  {'TOTAL':>9}  {'FAILED':>7}  OUTPUT")
    for status in runs:
        done = status["succeeded"] + status["failed"] + status["skipped"]
        typer.echo(
            f"{status['run_id']:22}  {status['state']:9}  {done:>9,}  {status['total']:>9,}  "
            f"{status['failed']:>7,}  {status['output']}"
        )
