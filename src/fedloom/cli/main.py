"""The ``fedloom`` command. Each sub-command lives in a module of its own."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

# gRPC's C core reads GRPC_VERBOSITY once, when grpc is first imported (by the sub-commands below). Left unset,
# a failed TLS handshake prints C-level log lines next to fedloom's one-line error; GRPC_VERBOSITY=INFO shows them.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import typer
from rich.console import Console
from rich.text import Text

from fedloom.cli import certs, client, ledger, partition, privacy, report, runs, serve, server, simulate, tokens, ui
from fedloom.core.errors import FedloomError

app = typer.Typer(
    name="fedloom",
    help="Federated learning: simulate a federation, deploy it, inspect its runs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from fedloom import __version__

        typer.echo(f"fedloom {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_version, is_eager=True
    ),
) -> None:
    """Federated learning: simulate a federation, deploy it, inspect its runs."""


app.command("simulate")(simulate.simulate_command)
app.command("partition")(partition.partition_command)
app.command("server")(server.server_command)
app.command("client")(client.client_command)
app.add_typer(runs.app, name="runs")
app.add_typer(certs.app, name="certs")
app.add_typer(tokens.app, name="token")
app.command("invite")(tokens.invite_command)
app.add_typer(privacy.app, name="privacy")
app.add_typer(ledger.app, name="ledger")
app.command("report")(report.report_command)
app.command("ui")(ui.ui_command)
app.command("serve")(serve.serve_command)
app.command("export")(serve.export_command)

_stderr = Console(stderr=True)
# What typer raises for a usage error (a bad value, a missing or unknown option, an unknown command): click's
# ClickException, from the click that typer runs on (recent typers carry their own copy, typer._click).
_CLICK_ERROR: type[Any] = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException")


def configure_logging() -> None:
    """The console shows warnings and errors, and what ``fedloom.data`` says about downloads. Records go through
    at ``INFO`` all the same, so that a client's telemetry (:mod:`fedloom.runtime.telemetry`) collects the
    lines a job logs at ``INFO`` for the server."""
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    console.addFilter(lambda record: record.levelno >= logging.WARNING or record.name.startswith("fedloom.data"))
    logging.basicConfig(level=logging.INFO, handlers=[console])


def _error(message: str) -> None:
    """Print ``error: MESSAGE`` on stderr (``message`` as it is, never read as markup)."""
    _stderr.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)


def main() -> None:
    """Entry point: runs the app. A fedloom error or a usage error (a bad flag value, a missing or unknown option)
    ends with one ``error: ...`` line on stderr and exit code 2; ``--help`` and ``--version`` exit 0."""
    configure_logging()
    try:
        code = app(prog_name="fedloom", standalone_mode=False)
    except FedloomError as exc:
        _error(str(exc))
        sys.exit(2)
    except _CLICK_ERROR as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # a group called without a command: typer printed its help
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        message = " ".join(exc.format_message().split())  # one line, whatever click wrapped
        _error(f"{message} (see '{ctx.command_path if ctx is not None else 'fedloom'} --help')")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _stderr.print("interrupted")
        sys.exit(130)
    if isinstance(code, int) and code:  # typer.Exit(code) and Ctrl-C (130) come back as the exit code
        sys.exit(code)
