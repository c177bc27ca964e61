"""``fedloom export``: a run's global model as a file other runtimes load.

- ``safetensors``: the params alone (any task), with the run, round and job in the file's metadata.
- ``onnx``: a :class:`~fedloom.TorchTask`'s model through torch's exporter (``torch.export``-based, which needs
  ``onnxscript``), with a dynamic batch dimension; input ``input``, output ``output`` (the model's raw outputs,
  logits for a classifier). Where onnxruntime is installed the file is checked at once: it must give torch's
  outputs on a batch of examples.
- ``torchscript``: a :class:`~fedloom.TorchTask`'s model traced with ``torch.jit.trace``, for LibTorch and older
  mobile runtimes. PyTorch deprecates TorchScript in favour of ``torch.export``; prefer ONNX where the runtime
  takes it.

The ONNX and TorchScript extras: ``pip install 'fedloom[export]'`` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedloom.core.checkpoint import save_params
from fedloom.core.errors import ConfigError
from fedloom.serving.model import ServedModel

__all__ = ["FORMATS", "Exported", "export"]

FORMATS = ("onnx", "torchscript", "safetensors")
_SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
_CHECK_BATCH = 16
_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Exported:
    """What :func:`export` wrote: where, and for ONNX the largest difference onnxruntime gave from torch on a
    batch of examples (``None`` where it was not checked)."""

    path: Path
    max_difference: float | None = None


def default_path(model: ServedModel, fmt: str) -> Path:
    """``<run id>-round<N>.<suffix>`` in the current folder."""
    return Path(f"{model.run_id}-round{model.server_round}{_SUFFIX[fmt]}")


def export(model: ServedModel, fmt: str, out: Path | None = None) -> Exported:
    """Write ``model`` in format ``fmt`` (one of :data:`FORMATS`) to ``out`` (default: :func:`default_path`).
    Raises :class:`ConfigError` for another format, a task that is not a TorchTask for ONNX and TorchScript,
    a missing extra, or an ONNX file onnxruntime does not run as torch does."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = out if out is not None else default_path(model, fmt)
    if fmt == "safetensors":
        metadata = {"run_id": model.run_id, "round": str(model.server_round), "job": model.job.name}
        save_params(path, model.params, metadata)
        return Exported(path)
    module, example = _torch_model(model, fmt)
    if fmt == "torchscript":
        import torch

        with _quiet():
            traced = torch.jit.trace(module, example)  # type: ignore[no-untyped-call]
            torch.jit.save(traced, str(path))
        return Exported(path)
    return Exported(path, _onnx(module, example, path))


def _torch_model(model: ServedModel, fmt: str) -> tuple[Any, Any]:
    """The task's torch module with the run's params, and a batch of zeros of the model's input shape."""
    task = model.job.task
    module_with = getattr(task, "module_with", None)
    if not callable(module_with):
        raise ConfigError(
            f"{fmt} export needs a TorchTask; job {model.job.name!r} has a {type(task).__name__} "
            "(--format safetensors exports any task's params)"
        )
    import torch

    module = module_with(model.params)
    device = next(module.parameters()).device
    return module, torch.zeros((2, *model.input_shape), dtype=torch.float32, device=device)


def _onnx(module: Any, example: Any, path: Path) -> float | None:
    import torch

    try:
        import onnxscript  # noqa: F401  (torch's exporter needs it; say so here, not deep inside torch)
    except ImportError:
        raise ConfigError("ONNX export needs onnx and onnxscript: pip install 'fedloom[export]'") from None
    batch = torch.export.Dim("batch")
    with _quiet():
        program = torch.onnx.export(
            module,
            (example,),
            input_names=["input"],
            output_names=["output"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            verbose=False,
        )
    if program is None:
        raise ConfigError("torch's ONNX exporter returned nothing")
    program.save(str(path))
    try:
        import onnxruntime
    except ImportError:
        return None
    generator = torch.Generator(device="cpu").manual_seed(0)
    check = torch.randn((_CHECK_BATCH, *example.shape[1:]), generator=generator).to(example.device)
    with torch.no_grad():
        expected = module(check).float().cpu().numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": check.cpu().numpy()})[0]
    difference = float(np.max(np.abs(got - expected))) if expected.size else 0.0
    if not difference <= _TOLERANCE * max(1.0, float(np.max(np.abs(expected)))):
        raise ConfigError(
            f"the ONNX file gives other outputs than torch under onnxruntime (max difference {difference:g})"
        )
    return difference


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch's exporters announce their own deprecations and skipped optional operators (torchvision's) as
    warnings and log lines; they are torch's business, not the user's."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
