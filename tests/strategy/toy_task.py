"""A task whose training a person can follow by hand, for golden-number tests of the client halves.

``w`` is a vector; a client's loss is ``1/2 ||w - t||^2`` with ``t`` the mean of its training rows, so the
gradient is ``w - t``. ``fit`` takes ``local_steps`` full gradient steps, with the proximal term and the
correction of the Task contract."""

from __future__ import annotations

import numpy as np

from fedloom.core import EvalResult, FitConfig, FitResult, Params
from fedloom.data import ArrayData, ClientData


class QuadraticTask:
    def init_params(self, seed: int) -> Params:
        return Params({"w": np.zeros(1)})

    def fit(
        self,
        params: Params,
        data: ArrayData,
        config: FitConfig,
        *,
        anchor: Params | None = None,
        correction: Params | None = None,
    ) -> FitResult:
        target = data.x.mean(axis=0)
        w = params["w"].astype(np.float64)
        start = (anchor if anchor is not None else params)["w"]
        shift = correction["w"] if correction is not None else 0.0
        steps = config.local_steps or 1
        for _ in range(steps):
            w = w - config.lr * ((w - target) + config.proximal_mu * (w - start) + shift)
        return FitResult(Params({"w": w}), len(data), {"loss": 0.5 * float(((w - target) ** 2).sum()), "steps": steps})

    def evaluate(self, params: Params, data: ArrayData) -> EvalResult:
        target = data.x.mean(axis=0)
        return EvalResult(0.5 * float(((params["w"] - target) ** 2).sum()), len(data), {})


def client_with_target(value: float, rows: int = 1) -> ClientData:
    """A client whose training rows all equal ``value`` (so its target is ``value``)."""
    x = np.full((rows, 1), value)
    data = ArrayData(x, np.zeros(rows, np.int64))
    return ClientData(data, data)
