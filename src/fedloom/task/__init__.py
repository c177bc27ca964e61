"""fedloom.task: what runs on a client.

``TorchTask`` is imported on first use, so ``import fedloom.task`` (and the NumPy task) never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedloom.task.base import Task
from fedloom.task.numpy_task import LogisticRegressionTask

if TYPE_CHECKING:
    from fedloom.task.torch_task import TorchTask

__all__ = ["LogisticRegressionTask", "Task", "TorchTask"]


def __getattr__(name: str) -> Any:
    if name == "TorchTask":
        from fedloom.task.torch_task import TorchTask

        return TorchTask
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "TorchTask"])
