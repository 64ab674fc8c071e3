"""How every ``caption-worker`` command prints results and failures."""

from __future__ import annotations

import json
from typing import Any

import typer


def print_json(value: Any) -> None:
    """One JSON document, indented, on stdout."""
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


def fail(exc: BaseException, code: int = 1) -> typer.Exit:
    """Print ``error: Type: message`` on stderr; the Exit to raise with ``code``."""
    typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
    return typer.Exit(code)
