"""fedloom.serving: a run's global model, served for prediction over HTTP (``fedloom serve``) or exported for other
runtimes (``fedloom export``: ONNX, TorchScript, safetensors)."""

from fedloom.serving.model import ServedModel

__all__ = ["ServedModel"]
