"""The ``fedloom`` command. Each sub-command lives in a module of its own."""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console

from fedloom.cli import runs, simulate
from fedloom.core.errors import FedloomError

app = typer.Typer(
    name="fedloom",
    help="Federated learning: simulate a federation, inspect its runs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("simulate")(simulate.simulate_command)
app.add_typer(runs.app, name="runs")

_stderr = Console(stderr=True)


def main() -> None:
    """Entry point: runs the app; a fedloom error ends with one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except FedloomError as exc:
        _stderr.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _stderr.print("interrupted")
        sys.exit(130)
