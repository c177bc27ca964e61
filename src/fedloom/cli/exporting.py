"""The exporter options that ``fedloom simulate`` and ``fedloom server`` share (:mod:`fedloom.tracking.exporters`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from fedloom.tracking.exporters import Exporter

__all__ = ["MlflowUri", "TensorBoardDir", "exporters"]

_PANEL = "Exporters"

MlflowUri = Annotated[
    str | None,
    typer.Option(
        "--mlflow-uri",
        help="Also log the run to this MLflow tracking server or store (http://..., file:///..., sqlite:///...): "
        "rounds as steps, a child run per client. Needs fedloom[mlflow].",
        rich_help_panel=_PANEL,
    ),
]
TensorBoardDir = Annotated[
    Path | None,
    typer.Option(
        "--tensorboard",
        help="Also write TensorBoard event files under DIR/<run-id>/: rounds as steps, clients as tags. "
        "Needs fedloom[tensorboard].",
        rich_help_panel=_PANEL,
        file_okay=False,
    ),
]


def exporters(mlflow_uri: str | None, tensorboard: Path | None) -> list[Exporter]:
    """The exporters the options ask for (none by default)."""
    from fedloom.tracking.exporters import MlflowExporter, TensorBoardExporter

    chosen: list[Exporter] = []
    if mlflow_uri is not None:
        chosen.append(MlflowExporter(mlflow_uri))
    if tensorboard is not None:
        chosen.append(TensorBoardExporter(tensorboard))
    return chosen
