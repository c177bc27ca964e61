"""``fedloom runs``: list, show, compare, export recorded runs, and read their clients' events and logs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from fedloom.core.errors import ConfigError

app = typer.Typer(help="List, show, compare and export recorded runs.", no_args_is_help=True)

RunsDir = Annotated[Path, typer.Option("--runs", help="Runs folder.")]
DbUrl = Annotated[
    str | None,
    typer.Option(
        "--db",
        envvar="FEDLOOM_DB",
        help="A run database that many runs share (postgresql+psycopg://user@host/db); the runs folder then holds "
        "only their checkpoints. Default: a SQLite file in each run's folder.",
    ),
]
RunRef = Annotated[str, typer.Argument(help="Run id, unique prefix, or run directory.")]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    """A plain table whose cells are never cut or wrapped: each column is as wide as its widest cell."""
    table = Table(box=box.SIMPLE_HEAD)
    for i, name in enumerate(header):
        table.add_column(name, no_wrap=True, min_width=max([len(name), *(len(row[i]) for row in rows)]))
    for row in rows:
        table.add_row(*row)
    return table


@app.command("list")
def list_command(runs: RunsDir = Path("runs"), db: DbUrl = None) -> None:
    """List the runs in a runs folder, newest first."""
    from fedloom.tracking import RunStore
    from fedloom.tracking.report import number

    infos = RunStore(runs, db).list_runs()
    console = Console(soft_wrap=True)
    if not infos:
        console.print(f"no runs in {runs}")
        return
    # The id is what `show` and `export` take, so no cell is ever cut or wrapped, whatever the terminal's
    # width; the id starts with the creation time, so a separate column for it would only cost width.
    header = ("run", "name", "status", "rounds", "central_accuracy")
    rows = [
        (info.run_id, info.name, info.status, str(info.rounds), number(info.final_metrics.get("central_accuracy")))
        for info in infos
    ]
    console.print(_table(header, rows))


@app.command("show")
def show_command(run: RunRef, runs: RunsDir = Path("runs"), db: DbUrl = None) -> None:
    """Show a run: where it is, and a table of its rounds."""
    from fedloom.tracking import RunStore
    from fedloom.tracking.report import number
    from fedloom.tracking.store import ROUND_COLUMNS

    store = RunStore(runs, db)
    info = store.info(run)
    rows = store.rounds(run)
    console = Console(soft_wrap=True)
    console.print(f"run [bold]{info.run_id}[/] in {info.path}", highlight=False)
    metric_names = sorted({k for row in rows for k in row} - set(ROUND_COLUMNS))
    columns = (*ROUND_COLUMNS, *metric_names)
    console.print(_table(columns, [tuple(number(row.get(c)) for c in columns) for row in rows]))


@app.command("compare")
def compare_command(
    run: Annotated[list[str], typer.Argument(help="Two or more runs: ids, unique prefixes, or run directories.")],
    runs: RunsDir = Path("runs"),
    db: DbUrl = None,
    metric: Annotated[
        list[str] | None,
        typer.Option(help="A metric to show round by round (repeat it); default: every metric all the runs share."),
    ] = None,
    rows: Annotated[int, typer.Option(help="Most rounds shown per metric (evenly spaced, last included).", min=2)] = 20,
) -> None:
    """Compare runs: the settings on which their configs differ, then each metric round by round, one column per
    run (runs are lettered A, B, ... in the order given)."""
    from fedloom.tracking import RunStore
    from fedloom.tracking.compare import config_diff, metric_table, shared_metrics
    from fedloom.tracking.report import number
    from fedloom.tracking.store import ROUND_COLUMNS

    if len(run) < 2:
        raise ConfigError("compare needs two runs or more")
    store = RunStore(runs, db)
    infos = [store.info(ref) for ref in run]
    configs = [store.config(ref) for ref in run]
    rounds = [store.rounds(ref) for ref in run]
    labels = [chr(ord("A") + i) if i < 26 else f"R{i + 1}" for i in range(len(infos))]
    console = Console(soft_wrap=True)
    for label, info in zip(labels, infos, strict=True):
        console.print(f"{label}  {info.run_id}", highlight=False)
    differ, same = config_diff(configs)
    console.print(f"\nconfig: {same} settings the same, {len(differ)} differ", highlight=False)
    if differ:
        console.print(_table(("setting", *labels), [(name, *(number(v) for v in values)) for name, values in differ]))
    available = shared_metrics(rounds, ROUND_COLUMNS)
    chosen = metric or available
    unknown = [m for m in chosen if m not in available]
    if unknown:
        raise ConfigError(
            f"not recorded by every run: {', '.join(unknown)}; shared metrics: {', '.join(available) or 'none'}"
        )
    for name in chosen:
        table = metric_table(rounds, name, rows)
        console.print(f"\n{name}", highlight=False)
        console.print(_table(("round", *labels), [(str(r), *(number(v) for v in values)) for r, values in table]))


@app.command("events")
def events_command(run: RunRef, runs: RunsDir = Path("runs"), db: DbUrl = None) -> None:
    """Show a deployment's client timeline: connections, instructions, replies, refusals, drops."""
    from fedloom.tracking import RunStore
    from fedloom.tracking.report import number

    store = RunStore(runs, db)
    events = store.client_events(run)
    console = Console(soft_wrap=True)
    if not events:
        console.print(f"run {store.info(run).run_id} has no client events (only deployments record them)")
        return
    header = ("time (UTC)", "round", "client", "event", "bytes", "detail")
    rows = [
        (
            f"{e['at']:%H:%M:%S.%f}"[:-3],
            number(e["round"]),
            e["client_id"],
            e["event"],
            str(e["bytes"]) if e["bytes"] else "",
            e["detail"] or "",
        )
        for e in events
    ]
    console.print(_table(header, rows))


@app.command("logs")
def logs_command(
    run: RunRef,
    runs: RunsDir = Path("runs"),
    db: DbUrl = None,
    grep: Annotated[str | None, typer.Option(help="Only lines whose text or logger holds this (any case).")] = None,
    client: Annotated[str | None, typer.Option(help="Only this client's lines.")] = None,
    level: Annotated[str | None, typer.Option(help="Only lines at this level or above (INFO ... CRITICAL).")] = None,
    round_: Annotated[int | None, typer.Option("--round", help="Only lines of this round.")] = None,
    last: Annotated[int, typer.Option(help="Show the last this many matching lines.", min=1, max=5000)] = 200,
) -> None:
    """Show the lines clients logged while they trained and evaluated (sent with their replies)."""
    from fedloom.tracking import RunStore, views

    store = RunStore(runs, db)
    found = views.logs_view(store, run, text=grep, client=client, level=level, server_round=round_, limit=last)
    console = Console(soft_wrap=True, highlight=False)
    for line in found["lines"]:
        head = f"{line['at'][11:23]} round {line['round']} {line['client_id']} {line['phase']} {line['level']} "
        console.print(f"{head}{line['logger']}: {line['message']}", markup=False)
    shown = len(found["lines"])
    if found["matched"] > shown:
        console.print(f"({found['matched']} lines match; the last {shown} are shown: --last to see more)")
    elif not shown:
        console.print(f"no lines match in run {store.info(run).run_id}")


@app.command("export")
def export_command(
    run: RunRef,
    fmt: Annotated[str, typer.Option("--format", help="csv or json.")] = "csv",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File to write (default: stdout).")] = None,
    runs: RunsDir = Path("runs"),
    db: DbUrl = None,
) -> None:
    """Export a run's rounds (csv) or everything recorded about it (json)."""
    from fedloom.tracking import RunStore

    text = RunStore(runs, db).export(run, fmt)
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)
