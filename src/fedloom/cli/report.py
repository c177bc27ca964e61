"""``fedloom report``: a run as one self-contained HTML file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedloom.cli.runs import DbUrl, RunRef, RunsDir
from fedloom.core.errors import ConfigError


def report_command(
    run: RunRef,
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")] = Path("report.html"),
    runs: RunsDir = Path("runs"),
    db: DbUrl = None,
) -> None:
    """Write RUN as one HTML file to share: summary, curves, the rounds table, per-client tables, the system
    profile, privacy, and the config. Everything is inline, so it opens offline."""
    from fedloom.tracking import RunStore
    from fedloom.tracking.report import render_report

    text = render_report(RunStore(runs, db), run)
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror}") from None
    typer.echo(f"wrote {out} ({len(text.encode()):,} bytes)")
