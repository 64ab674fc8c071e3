#!/usr/bin/env python3
"""Plot a caption run from Prometheus: images/s, queue depth and queued work, as a PNG.

Reads Prometheus' HTTP API (``/api/v1/query_range``) with the dashboard's own expressions
(docker/grafana/caption-worker.json: "Images / s", "Queue depth", "Queued work"), so the
picture shows what the dashboard would. Needs matplotlib (the ``dev`` extra).

    .venv/bin/python scripts/plot_run.py --prometheus http://127.0.0.1:9090 \\
        --start now-15m --end now --queue captions --output run.png

Times are Unix seconds, ISO 8601 (``2025-01-31T12:00:00+00:00``), ``now`` or
``now-<n>s|m|h``. scripts/record_run.py records a run and calls ``plot`` itself.
"""

from __future__ import annotations

import argparse
import json
import re
import textwrap
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

IMAGES = 'sum(rate(caption_images_total{{queue=~"{queue}"}}[{window}]))'
WAITING = 'sum(caption_queue_waiting{{queue=~"{queue}"}})'
RESERVED = 'sum(caption_queue_reserved{{queue=~"{queue}"}})'
WORK = 'sum(caption_queued_work_seconds{{queue=~"{queue}"}})'


@dataclass(frozen=True)
class Series:
    """One expression over the range: seconds since the range's start, and values."""

    seconds: list[float]
    values: list[float]


def parse_time(text: str, now: float | None = None) -> float:
    """Unix seconds from ``1738324800``, an ISO 8601 time, ``now`` or ``now-15m``."""
    now = time.time() if now is None else now
    relative = re.fullmatch(r"now(?:-(\d+(?:\.\d+)?)([smh]))?", text.strip())
    if relative:
        amount, unit = relative.groups()
        return now - (float(amount) * {"s": 1, "m": 60, "h": 3600}[unit] if amount else 0.0)
    try:
        return float(text)
    except ValueError:
        return datetime.fromisoformat(text).timestamp()


def query_range(
    prometheus: str, expr: str, start: float, end: float, step: float, origin: float | None = None
) -> Series:
    """One expression over [start, end] (its single series, or nothing); times are seconds
    since ``origin`` (default ``start``)."""
    params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
    url = f"{prometheus.rstrip('/')}/api/v1/query_range?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=60) as answer:
        body = json.loads(answer.read())
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {expr!r}: {body}")
    result = body["data"]["result"]
    if len(result) > 1:
        raise RuntimeError(f"{expr!r} returned {len(result)} series, expected one")
    points = result[0]["values"] if result else []
    zero = start if origin is None else origin
    return Series([float(t) - zero for t, _ in points], [float(v) for _, v in points])


def plot(
    prometheus: str,
    start: float,
    end: float,
    output: Path,
    *,
    queue: str = ".*",
    step: float = 1.0,
    rate_window: str = "15s",
    title: str | None = None,
    note: str | None = None,
    origin: float | None = None,
    origin_label: str | None = None,
) -> dict[str, Series]:
    """Query the run and write the PNG; the series plotted, by name.

    The x axis is seconds since ``origin`` (default ``start``), which ``origin_label``
    names (default its local time).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = {"queue": queue, "window": rate_window}
    series = {
        name: query_range(prometheus, expr.format(**fields), start, end, step, origin)
        for name, expr in (
            ("images", IMAGES),
            ("waiting", WAITING),
            ("reserved", RESERVED),
            ("work", WORK),
        )
    }
    depth = _add(series["waiting"], series["reserved"])

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [1, 1.3]}
    )
    top.plot(series["images"].seconds, series["images"].values, color="tab:green", lw=1.8)
    top.set_ylabel("images / s")
    top.set_title(f"captions delivered (rate over {rate_window})", fontsize=10, loc="left")
    top.set_ylim(bottom=0)
    top.grid(alpha=0.3)

    bottom.plot(depth.seconds, depth.values, color="tab:blue", lw=1.8, label="waiting + reserved")
    bottom.plot(
        series["reserved"].seconds,
        series["reserved"].values,
        color="tab:blue",
        lw=1,
        ls="--",
        label="reserved by workers",
    )
    bottom.set_ylabel("tasks")
    bottom.set_ylim(bottom=0)
    zero = start if origin is None else origin
    began = origin_label or datetime.fromtimestamp(zero).isoformat(timespec="seconds")
    bottom.set_xlabel(f"seconds since {began}")
    bottom.grid(alpha=0.3)
    work_axis = bottom.twinx()
    work_axis.plot(
        series["work"].seconds,
        series["work"].values,
        color="tab:orange",
        lw=1.5,
        label="queued work (GPU-s of one worker)",
    )
    work_axis.set_ylabel("queued work, s", color="tab:orange")
    work_axis.set_ylim(bottom=0)
    work_axis.tick_params(axis="y", colors="tab:orange")
    lines = bottom.get_lines() + work_axis.get_lines()
    bottom.legend(lines, [str(line.get_label()) for line in lines], loc="upper right", fontsize=8)
    bottom.set_title("queue (caption-worker exporter)", fontsize=10, loc="left")

    if title:
        fig.suptitle(title, fontsize=12)
    lines_of_note = textwrap.wrap(note, 150) if note else []
    if lines_of_note:
        fig.text(0.01, 0.008, "\n".join(lines_of_note), fontsize=7.5, color="0.35", va="bottom")
    fig.tight_layout(rect=(0, 0.012 + 0.022 * len(lines_of_note), 1, 1))
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return {**series, "depth": depth}


def _add(a: Series, b: Series) -> Series:
    """a + b at the instants both have (as PromQL's ``+`` would)."""
    other = dict(zip(b.seconds, b.values, strict=True))
    pairs = [(t, v + other[t]) for t, v in zip(a.seconds, a.values, strict=True) if t in other]
    return Series([t for t, _ in pairs], [v for _, v in pairs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--start", required=True, help="Unix seconds, ISO 8601 or now-15m")
    parser.add_argument("--end", default="now", help="as --start (default now)")
    parser.add_argument("--queue", default=".*", help="queue name or regex (default all)")
    parser.add_argument("--step", type=float, default=1.0, help="seconds between points")
    parser.add_argument("--rate-window", default="15s", help="rate() window (default 15s)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--note", default=None, help="a small line at the bottom")
    parser.add_argument("--output", type=Path, required=True, help="PNG to write")
    args = parser.parse_args()
    now = time.time()
    plot(
        args.prometheus,
        parse_time(args.start, now),
        parse_time(args.end, now),
        args.output,
        queue=args.queue,
        step=args.step,
        rate_window=args.rate_window,
        title=args.title,
        note=args.note,
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
