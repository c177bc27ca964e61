"""fedloom.tracking: the run store (SQLite), checkpoints (safetensors) and run summaries.

:class:`RunRecorder` writes a run while the server loop runs it; :class:`RunStore` reads runs back (list,
resolve a reference, rounds, client records, export); :func:`save_params` and :func:`load_params` read and
write checkpoints; :class:`MlflowExporter` and :class:`TensorBoardExporter` mirror runs elsewhere as they are
recorded. Nothing in a run directory is pickle.

Each name is imported on first use, so that reading runs (``fedloom runs list``) does not load what recording
them needs (the server loop, the privacy ledger).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedloom.core.exports import lazy_exports

if TYPE_CHECKING:
    from fedloom.core.checkpoint import load_params, save_params
    from fedloom.tracking.exporters import Exporter, MlflowExporter, TensorBoardExporter
    from fedloom.tracking.recorder import RunRecorder
    from fedloom.tracking.store import RunInfo, RunStore

__all__ = [
    "Exporter",
    "MlflowExporter",
    "RunInfo",
    "RunRecorder",
    "RunStore",
    "TensorBoardExporter",
    "load_params",
    "save_params",
]

_HOMES = {
    "load_params": "fedloom.core.checkpoint",
    "save_params": "fedloom.core.checkpoint",
    **dict.fromkeys(("Exporter", "MlflowExporter", "TensorBoardExporter"), "fedloom.tracking.exporters"),
    "RunRecorder": "fedloom.tracking.recorder",
    "RunInfo": "fedloom.tracking.store",
    "RunStore": "fedloom.tracking.store",
}


__getattr__, __dir__ = lazy_exports(__name__, _HOMES, __all__)
