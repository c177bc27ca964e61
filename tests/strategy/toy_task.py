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


class TwoPartTask:
    """Two scalars, ``body`` and ``head``, that must add up to the client's target: the loss is
    ``1/2 (body + head - t)^2``, so each gradient is ``body + head - t``. ``frozen`` keeps a part fixed, so
    training the parts in turn (FedRep) differs from training them together (FedPer)."""

    def init_params(self, seed: int) -> Params:
        return Params({"body": np.zeros(1), "head": np.zeros(1)})

    def fit(
        self,
        params: Params,
        data: ArrayData,
        config: FitConfig,
        *,
        anchor: Params | None = None,
        correction: Params | None = None,
        frozen: tuple[str, ...] | list[str] = (),
    ) -> FitResult:
        target = data.x.mean(axis=0)
        model = {n: params[n].astype(np.float64) for n in ("body", "head")}
        steps = config.local_steps or config.local_epochs or 1
        for _ in range(steps):
            grad = model["body"] + model["head"] - target
            model = {n: v if n in frozen else v - config.lr * grad for n, v in model.items()}
        loss = 0.5 * float(((model["body"] + model["head"] - target) ** 2).sum())
        return FitResult(Params(model), len(data), {"loss": loss, "steps": float(steps)})

    def evaluate(self, params: Params, data: ArrayData) -> EvalResult:
        target = data.x.mean(axis=0)
        return EvalResult(0.5 * float(((params["body"] + params["head"] - target) ** 2).sum()), len(data), {})
