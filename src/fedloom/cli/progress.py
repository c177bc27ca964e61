"""Console output for a running simulation or deployment: its headlines, a progress bar over rounds and one line
per round."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from fedloom.core.params import Params
    from fedloom.runtime.records import RoundRecord

# The metrics shown on each round's line, in order, with their short labels.
_SHOWN = (
    ("fit_loss", "fit_loss"),
    ("federated_loss", "fed_loss"),
    ("federated_accuracy", "fed_acc"),
    ("central_loss", "loss"),
    ("central_accuracy", "acc"),
)


def format_round(record: RoundRecord, rounds: int) -> str:
    """One line: round, clients that replied of those asked, main metrics, seconds, and why a failed round
    failed."""
    from fedloom.runtime.records import ClientStatus

    fit = [c for c in record.clients if c.phase == "fit"]
    ok = sum(c.status == ClientStatus.OK for c in fit)
    parts = [f"round {record.server_round:>{len(str(rounds))}}/{rounds}", f"clients {ok}/{len(fit)}"]
    parts += [f"{label} {record.metrics[key]:.4f}" for key, label in _SHOWN if key in record.metrics]
    parts.append(f"{record.seconds:.2f}s")
    if record.failure is not None:
        parts.append(f"FAILED (the model stays as it was): {record.failure}")
    return "  ".join(parts)


def print_announcements(console: Console) -> None:
    """Print what :func:`~fedloom.app.simulate` and :func:`~fedloom.app.serve` log about the run on the
    ``fedloom.run`` logger (its headline, the backend and why, the clients that joined) as lines of the output."""

    class ToConsole(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            console.print(record.getMessage(), highlight=False, markup=False)

    logger = logging.getLogger("fedloom.run")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.handlers = [ToConsole(logging.INFO)]


class RoundLines:
    """Prints a line per finished round (a deployment's, which has no progress bar)."""

    def __init__(self, console: Console, rounds: int) -> None:
        self._console = console
        self._rounds = rounds

    def on_round(self, record: RoundRecord, params: Params) -> None:
        self._console.print(format_round(record, self._rounds), highlight=False)


class ConsoleProgress:
    """A round observer that draws a rich progress bar and prints a line per finished round."""

    def __init__(self, console: Console, rounds: int, description: str) -> None:
        self._console = console
        self._rounds = rounds
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self._task_id = self._progress.add_task(description, total=rounds)

    def __enter__(self) -> ConsoleProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def on_round(self, record: RoundRecord, params: Params) -> None:
        self._progress.console.print(format_round(record, self._rounds), highlight=False)
        self._progress.advance(self._task_id)


def metric_text(value: float) -> str:
    """A final metric for a summary line: four decimals, or three significant digits where four decimals would
    show a small value (a quantization bound, a delta) as 0.0000."""
    return f"{value:.3g}" if value != 0 and abs(value) < 1e-3 else f"{value:.4f}"
