"""Console output for a running simulation: a progress bar over rounds and one line per round."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedloom.core.params import Params
from fedloom.runtime.records import ClientStatus, RoundRecord

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
    fit = [c for c in record.clients if c.phase == "fit"]
    ok = sum(c.status == ClientStatus.OK for c in fit)
    parts = [f"round {record.server_round:>{len(str(rounds))}}/{rounds}", f"clients {ok}/{len(fit)}"]
    parts += [f"{label} {record.metrics[key]:.4f}" for key, label in _SHOWN if key in record.metrics]
    parts.append(f"{record.seconds:.2f}s")
    if record.failure is not None:
        parts.append(f"FAILED (the model stays as it was): {record.failure}")
    return "  ".join(parts)


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
