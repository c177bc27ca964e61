"""``fedloom ledger``: check a run's privacy ledger."""

from __future__ import annotations

from pathlib import Path

import typer

from fedloom.cli.runs import DbUrl, RunRef, RunsDir

app = typer.Typer(help="The privacy ledger: what left each client each round, hash-chained.", no_args_is_help=True)


@app.command("verify")
def verify_command(run: RunRef, runs: RunsDir = Path("runs"), db: DbUrl = None) -> None:
    """Check that RUN's privacy ledger is intact: no record edited, removed, added or cut off since it was
    written (each record chains to the one before, and each round's checkpoint holds the ledger's head then)."""
    from fedloom.core.checkpoint import checkpoint_metadata
    from fedloom.privacy.ledger import LEDGER_FILE, verify
    from fedloom.tracking import RunStore
    from fedloom.tracking.recorder import LEDGER_HEAD_KEY, checkpoint_path

    store = RunStore(runs, db)
    run_dir = store.run_dir(run)
    info = store.info(run)
    heads = {}
    for row in store.rounds(run):
        path = checkpoint_path(run_dir, row["round"])
        if path.is_file():
            head = checkpoint_metadata(path).get(LEDGER_HEAD_KEY)
            if head is not None:
                heads[int(row["round"])] = head
    report = verify(run_dir / LEDGER_FILE, info.run_id, heads)
    typer.echo(
        f"ledger of run {info.run_id}: {report.records} updates over {report.rounds} rounds, intact "
        f"(checked against {len(heads)} checkpoints); head {report.head}"
    )
