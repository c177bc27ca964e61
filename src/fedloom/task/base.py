"""The ``Task`` contract: what runs on a client, independent of how clients are run."""

from __future__ import annotations

from collections.abc import Collection
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
    - ``fit(params, data, config, anchor=None, correction=None, frozen=())``: train a copy of ``params`` on ``data`` as
      ``config`` says (E epochs or S steps of minibatch SGD with batch size B, shuffled by ``config.seed``);
      never mutates ``params``. Federated algorithms change the local objective through two optional terms,
      added to the gradient of every trainable floating-point parameter at every step:
      ``config.proximal_mu * (w - anchor)`` (FedProx, Ditto; ``anchor`` defaults to ``params``, the model
      training starts from) and ``correction`` (SCAFFOLD's ``c - c_i``), a constant per parameter; a name
      missing from ``correction`` gets none. ``frozen`` names parameters that keep their values (FedRep trains
      its personal head with the shared body frozen, then the body with the head frozen); a task that cannot
      freeze parameters may leave the keyword out, and only algorithms that freeze need it. Report ``steps``
      (local steps taken) in the metrics: FedNova and SCAFFOLD need it.
    - ``evaluate(params, data)``: loss (mean over examples) and metrics such as ``accuracy`` on ``data``.

    Both ``fit`` and ``evaluate`` must be deterministic for the same inputs on CPU.
    """

    def init_params(self, seed: int) -> Params: ...

    def fit(
        self,
        params: Params,
        data: ArrayData,
        config: FitConfig,
        *,
        anchor: Params | None = None,
        correction: Params | None = None,
        frozen: Collection[str] = (),
    ) -> FitResult: ...

    def evaluate(self, params: Params, data: ArrayData) -> EvalResult: ...
