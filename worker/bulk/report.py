"""What a bulk run produced (``caption-worker bulk report RUN``), read from its files in S3.

The report streams the run's shard outputs and skipped files one file at a time and keeps
only counters, the first few examples of each error type and one 8-byte hash per item id
(to find ids written twice), so its memory follows the number of items only through those
hashes, never through the lines themselves.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from worker.bulk.errors import SourceNotFound
from worker.bulk.runfiles import Line, RunFiles

#: Output statuses a line can have (docs/bulk.md, Output line).
OK, ERROR, SKIPPED = "ok", "error", "skipped"
DONE, INCOMPLETE = "done", "incomplete"
#: A line's error or finish reason when the line does not say.
UNKNOWN = "unknown"
#: Longest message ``format_report`` prints for an error example.
MESSAGE_CHARS = 200


def _id_hash(item_id: Any) -> int:
    # 8 bytes of blake2b as an int: about 70 bytes an id in the set (measured: 69.5 MB for a
    # million ids), whatever the key's length (S3 keys go to 1,024 bytes). Two different ids
    # collide with probability about n**2 / 2**65: 3e-6 for ten million ids, and a collision
    # can only report a duplicate that is not there, never hide one.
    digest = hashlib.blake2b(str(item_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass
class ErrorGroup:
    """The error lines of one type: how many, and the first few."""

    count: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self, error_type: str) -> dict[str, Any]:
        return {"type": error_type, "count": self.count, "examples": self.examples}


@dataclass
class Tally:
    """Counters over a run's lines, fed one line at a time."""

    examples: int
    lines: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finish_reasons: Counter[str] = field(default_factory=Counter)
    errors: dict[str, ErrorGroup] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)
    repeated: set[int] = field(default_factory=set)  # rare: a sound run has none

    def add(self, line: Line) -> None:
        """Count one output or skipped line."""
        key = _id_hash(line.get("id"))
        if key in self.seen:
            self.repeated.add(key)
        else:
            self.seen.add(key)
        status = str(line.get("status"))
        self.statuses[status] += 1
        if status == OK:
            self.prompt_tokens += int(line.get("prompt_tokens") or 0)
            self.generated_tokens += int(line.get("generated_tokens") or 0)
            self.finish_reasons[str(line.get("finish_reason") or UNKNOWN)] += 1
        elif status == ERROR:
            self._add_error(line)

    def _add_error(self, line: Line) -> None:
        error = line.get("error")
        error = error if isinstance(error, dict) else {}
        group = self.errors.setdefault(str(error.get("type") or UNKNOWN), ErrorGroup())
        group.count += 1
        if len(group.examples) < self.examples:
            group.examples.append(
                {"id": line.get("id"), "image": line.get("image"), "message": error.get("message")}
            )

    def error_groups(self) -> list[dict[str, Any]]:
        """Error groups, the most frequent first (ties by type, so the order is stable)."""
        ordered = sorted(self.errors.items(), key=lambda item: (-item[1].count, item[0]))
        return [group.to_json(error_type) for error_type, group in ordered]


def _objects(lines: list[Line] | None) -> list[Line] | None:
    """The lines, checked to be JSON objects; ValueError when one is not."""
    if lines is not None and not all(isinstance(line, dict) for line in lines):
        raise ValueError("a line is not a JSON object")
    return lines


def read_skipped(files: RunFiles, number: int) -> list[Line]:
    """The lines of ``skipped/NNNNN.jsonl``. Submit writes every skipped file before
    run.json, so a missing one is a damaged run: SourceNotFound."""
    lines = _objects(files.skipped(number))
    if lines is None:
        where = files.uri + _relative(files, files.layout.skipped(number))
        raise SourceNotFound(f"{where} does not exist")
    return lines


def _output_lines(files: RunFiles, shard: int) -> list[Line] | None:
    return _objects(files.output(shard))


def _relative(files: RunFiles, key: str) -> str:
    return key[len(files.layout.root) :]


def _tally_files(
    files: RunFiles, tally: Tally, outputs: Iterable[int], skipped_files: int
) -> tuple[list[int], list[str]]:
    """Feed every output and skipped file to ``tally``, one file in memory at a time.
    Returns the shards whose output was read and the files that did not parse."""
    read: list[int] = []
    unreadable: list[str] = []
    for shard in outputs:
        try:
            lines = _output_lines(files, shard)
        except ValueError:  # a damaged file is reported, not a reason to report nothing
            unreadable.append(_relative(files, files.layout.output(shard)))
            continue
        if lines is None:  # deleted between the listing and the read
            continue
        read.append(shard)
        for line in lines:
            tally.add(line)
    tally.lines = sum(tally.statuses.values())  # outputs only: counted before skipped files
    for number in range(skipped_files):
        try:
            lines = read_skipped(files, number)
        except ValueError:
            unreadable.append(_relative(files, files.layout.skipped(number)))
            continue
        for line in lines:
            tally.add(line)
    return read, unreadable


def build_report(files: RunFiles, *, examples: int = 5) -> dict[str, Any]:
    """What the run wrote so far: counts by status, tokens, finish reasons, errors grouped
    by type with up to ``examples`` examples each, items still missing an output, and ids
    written more than once (0 for a sound run). Raises SourceNotFound without run.json."""
    run = files.run_json()
    if run is None:
        raise SourceNotFound(f"{files.uri}run.json does not exist: not a planned run")
    counts = run["counts"]
    shards = int(counts["shards"])
    tally = Tally(examples=max(examples, 0))
    read, unreadable = _tally_files(
        files, tally, files.output_shards(), int(counts.get("skipped_shards", 0))
    )
    complete = len({shard for shard in read if shard < shards}) >= shards
    return {
        "run_id": run.get("run_id", files.layout.run_id),
        "output": files.uri,
        "state": DONE if complete else INCOMPLETE,
        "total": int(counts["total"]),
        "lines": tally.lines,
        "ok": tally.statuses[OK],
        "error": tally.statuses[ERROR],
        "skipped": tally.statuses[SKIPPED],
        "missing": max(int(counts["to_caption"]) - tally.lines, 0),
        "prompt_tokens": tally.prompt_tokens,
        "generated_tokens": tally.generated_tokens,
        "finish_reasons": dict(tally.finish_reasons.most_common()),
        "errors": tally.error_groups(),
        "duplicates": len(tally.repeated),
        "shards": shards,
        "shards_done": len(read),
        "unreadable": unreadable,
    }


def _one_line(text: Any) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= MESSAGE_CHARS else flat[: MESSAGE_CHARS - 3] + "..."


def _error_line(group: dict[str, Any]) -> str:
    line = f"  {group['type']}: {group['count']:,}"
    if group["examples"]:
        first = group["examples"][0]
        line += f"  e.g. {first['image']}: {_one_line(first['message'])}"
    return line


def format_report(report: dict[str, Any]) -> str:
    """The report as text for a terminal: a counts line, one line per error type (count,
    first example), finish reasons, and warnings for duplicates and unreadable files."""
    lines = [
        f"{report['run_id']} {report['state']}: {report['total']:,} items, "
        f"{report['ok']:,} ok, {report['error']:,} error, {report['skipped']:,} skipped, "
        f"{report['missing']:,} missing ({report['shards_done']:,}/{report['shards']:,} "
        f"shards); tokens {report['prompt_tokens']:,} prompt, "
        f"{report['generated_tokens']:,} generated",
        f"output: {report['output']}",
    ]
    if report["errors"]:
        lines.append("errors:")
        lines.extend(_error_line(group) for group in report["errors"])
    if report["finish_reasons"]:
        reasons = ", ".join(f"{name} {n:,}" for name, n in report["finish_reasons"].items())
        lines.append(f"finish reasons: {reasons}")
    if report["duplicates"]:
        lines.append(f"warning: {report['duplicates']:,} ids appear more than once")
    if report["unreadable"]:
        lines.append(f"warning: files that do not parse: {', '.join(report['unreadable'])}")
    return "\n".join(lines)
