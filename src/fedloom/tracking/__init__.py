"""fedloom.tracking: the run store (SQLite), checkpoints (safetensors) and run summaries.

:class:`RunRecorder` writes a run while the server loop runs it; :class:`RunStore` reads runs back (list,
resolve a reference, rounds, client records, export); :func:`save_params` and :func:`load_params` read and
write checkpoints; :class:`MlflowExporter` and :class:`TensorBoardExporter` mirror runs elsewhere as they are
recorded. Nothing in a run directory is pickle.
"""

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
