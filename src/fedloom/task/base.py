"""The ``Task`` contract: what runs on a client, independent of how clients are run."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from fedloom.core.config import FitConfig
from fedloom.core.params import Params
from fedloom.core.results import EvalResult, FitResult
from fedloom.data.base import ArrayData

__all__ = ["Task"]


@runtime_checkable
class Task(Protocol):
    """What a client computes.

    - ``init_params(seed)``: the initial global model, the same for the same seed.
    - ``fit(params, data, config)``: train a copy of ``params`` on ``data`` as ``config`` says (E epochs or S
      steps of minibatch SGD with batch size B, shuffled by ``config.seed``); never mutates ``params``.
    - ``evaluate(params, data)``: loss (mean over examples) and metrics such as ``accuracy`` on ``data``.

    Both ``fit`` and ``evaluate`` must be deterministic for the same inputs on CPU.
    """

    def init_params(self, seed: int) -> Params: ...

    def fit(self, params: Params, data: ArrayData, config: FitConfig) -> FitResult: ...

    def evaluate(self, params: Params, data: ArrayData) -> EvalResult: ...
