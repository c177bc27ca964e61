"""FedAvg, as Algorithm 1 of McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", with the server-side pieces later papers add to it: a server optimizer (FedAvgM, FedOpt),
a robust aggregation rule and norm bounding of each update; and FedProx, which is FedAvg with a proximal term
in the clients' objective."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedloom.core.config import FitConfig
from fedloom.core.errors import ConfigError, NotEnoughClientsError
from fedloom.core.params import Params
from fedloom.core.results import FitResult
from fedloom.strategy.aggregate import RunningMean, cast_like, f64, fit_loss, weighted_mean_scalar
from fedloom.strategy.optimizers import Adagrad, Adam, ServerOptimizer, ServerSGD, Yogi
from fedloom.strategy.robust import Aggregator, clip_to_norm
from fedloom.strategy.sampling import ClientSampling

__all__ = ["FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedAvgState", "FedProx", "FedYogi"]


@dataclass(frozen=True)
class FedAvgState:
    """The global model after ``server_round`` rounds, and the server optimizer's state (empty without one)."""

    params: Params
    server_round: int = 0
    optimizer: Params = field(default_factory=lambda: Params({}))


@dataclass(frozen=True)
class FedAvg(ClientSampling):
    """Federated averaging: the new global model is ``sum_k n_k / n * w_k`` over the clients that replied,
    ``n_k`` being each client's number of training examples (sampling, local training and evaluation as
    :class:`~fedloom.strategy.sampling.ClientSampling` says).

    Three optional server-side pieces, each a small object of its own, change how the replies become the new
    model; with none of them this is McMahan et al.'s FedAvg, folded in as the replies arrive:

    - ``clip_norm``: norm bounding (Sun et al. 2019): each update ``w_k - w`` is scaled down to at most this
      L2 norm (over the whole model) before aggregation.
    - ``aggregator``: a robust rule over the updates instead of the weighted mean
      (:mod:`fedloom.strategy.robust`: ``Median()``, ``TrimmedMean(beta)``, ``Krum(f, m)``, ``Bulyan(f)``).
      It needs every update of the round at once, so the server holds them all.
    - ``server_optimizer``: the aggregated update is a pseudo-gradient for a server optimizer
      (:mod:`fedloom.strategy.optimizers`: ``ServerSGD`` with momentum is FedAvgM, ``Adam``, ``Yogi`` and
      ``Adagrad`` are FedOpt), whose state is part of the strategy's state.

    >>> strategy = FedAvg(fraction=0.1, fit=FitConfig(local_epochs=5, batch_size=10, lr=0.1))
    """

    aggregator: Aggregator | None = None
    server_optimizer: ServerOptimizer | None = None
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"clip_norm must be > 0, got {self.clip_norm}")

    def init(self, params: Params) -> FedAvgState:
        return FedAvgState(params, 0, self.server_init(params))

    def aggregate_fit(
        self, server_round: int, state: FedAvgState, results: Mapping[str, FitResult]
    ) -> tuple[FedAvgState, dict[str, float]]:
        if self.aggregator is None:
            fold = _FedAvgFold(self, server_round, state)
            for client_id, result in results.items():
                fold.add(client_id, result)
            return fold.finish()
        if not results:
            raise NotEnoughClientsError(f"round {server_round}: no client returned an update")
        updates = [self._update(state.params, r.params) for r in results.values()]
        delta = self.aggregator(updates, [r.num_examples for r in results.values()])
        return self._advance(server_round, state, delta=delta), fit_loss(results.values())

    def fold_fit(self, server_round: int, state: FedAvgState) -> _FedAvgFold | None:
        """The round's aggregation, one update at a time; ``None`` with a robust ``aggregator``, which needs
        every update at once."""
        return None if self.aggregator is not None else _FedAvgFold(self, server_round, state)

    def summable(self) -> str | None:
        """``None``: FedAvg's aggregate is the example-weighted mean of the updates (a
        :class:`~fedloom.strategy.base.SummableStrategy`), unless a robust ``aggregator`` replaces it."""
        if self.aggregator is not None:
            return "a robust aggregator needs every update, and a protected sum shows only their total"
        return None

    def server_init(self, params: Params) -> Params:
        """The server optimizer's state before round 1 (empty without one)."""
        return self.server_optimizer.init(params) if self.server_optimizer is not None else Params({})

    def server_step(self, params: Params, delta: Params, optimizer_state: Params) -> tuple[Params, Params]:
        """``params`` moved by the round's mean update ``delta`` (float64): through the server optimizer, or
        added as it is without one; and the optimizer's state after the step."""
        if self.server_optimizer is None:
            return cast_like(params, {n: f64(params[n]) + f64(delta[n]) for n in params}), optimizer_state
        return self.server_optimizer.step(params, delta, optimizer_state)

    def apply_update(self, server_round: int, state: FedAvgState, delta: Params) -> FedAvgState:
        """The state after round ``server_round`` from the round's aggregated float64 update ``delta`` (the mean
        of ``w_k - w``), through the server optimizer if there is one: for protocols that learn only the
        aggregate, never the clients' models (secure aggregation)."""
        return self._advance(server_round, state, delta=delta)

    def _update(self, global_params: Params, params: Params) -> Params:
        """``params - global_params`` in float64, bounded to ``clip_norm`` where that is set."""
        delta = Params({name: f64(params[name]) - f64(global_params[name]) for name in global_params}, copy=False)
        return clip_to_norm(delta, self.clip_norm) if self.clip_norm is not None else delta

    def _advance(
        self, server_round: int, state: FedAvgState, *, delta: Params | None = None, mean: Params | None = None
    ) -> FedAvgState:
        """The state after applying the round's aggregated float64 ``delta`` (or the new model ``mean``) through
        the server optimizer, if there is one."""
        x = state.params
        if self.server_optimizer is None and mean is not None:
            return FedAvgState(mean, server_round, state.optimizer)
        if delta is None:
            assert mean is not None
            delta = Params({n: f64(mean[n]) - f64(x[n]) for n in x}, copy=False)
        params, optimizer = self.server_step(x, delta, state.optimizer)
        return FedAvgState(params, server_round, optimizer)


class _FedAvgFold:
    """FedAvg's aggregation of one round, one update at a time: the example-weighted mean of the params (or of
    the norm-bounded updates) and of the reported training losses."""

    def __init__(self, strategy: FedAvg, server_round: int, state: FedAvgState) -> None:
        self._strategy = strategy
        self._round = server_round
        self._state = state
        self._mean = RunningMean()
        self._losses: list[tuple[float, int]] | None = []

    def add(self, client_id: str, result: FitResult) -> None:
        if self._strategy.clip_norm is not None:
            self._mean.add(self._strategy._update(self._state.params, result.params), result.num_examples)
        else:
            self._mean.add(result.params, result.num_examples)
        if self._losses is not None and "loss" in result.metrics:
            self._losses.append((result.metrics["loss"], result.num_examples))
        else:
            self._losses = None  # a client without a loss: no fit_loss this round

    def finish(self) -> tuple[FedAvgState, dict[str, float]]:
        if not self._mean.count:
            raise NotEnoughClientsError(f"round {self._round}: no client returned an update")
        try:
            if self._strategy.clip_norm is not None:  # a mean of float64 updates
                state = self._strategy._advance(self._round, self._state, delta=self._mean.result())
            elif self._strategy.server_optimizer is not None:
                state = self._strategy._advance(self._round, self._state, mean=self._mean.result(np.float64))
            else:
                state = self._strategy._advance(self._round, self._state, mean=self._mean.result())
        except ConfigError:
            raise NotEnoughClientsError(f"round {self._round}: the clients that replied have no examples") from None
        metrics = {}
        if self._losses:
            losses, counts = zip(*self._losses, strict=True)
            metrics["fit_loss"] = weighted_mean_scalar(losses, counts)
        return state, metrics


# -- named configurations ------------------------------------------------------------------------------------


def FedProx(mu: float | None = None, **kwargs: Any) -> FedAvg:  # noqa: N802  (named as the algorithm)
    """FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"): FedAvg whose clients
    minimize ``f_k(w) + mu / 2 * ||w - w_global||^2``, which keeps local models near the global one when
    clients differ and do unequal amounts of work (``work_range``). ``mu=None`` keeps the ``proximal_mu`` of the
    given ``fit`` where that is set, else 0.01. Other arguments are :class:`FedAvg`'s."""
    fit: FitConfig = kwargs.pop("fit", FitConfig())
    chosen = mu if mu is not None else (fit.proximal_mu or 0.01)
    return FedAvg(fit=replace(fit, proximal_mu=chosen), **kwargs)


def FedAvgM(server_lr: float = 1.0, momentum: float = 0.9, **kwargs: Any) -> FedAvg:  # noqa: N802
    """FedAvgM (Hsu et al. 2019): FedAvg with server momentum, ``v = momentum * v + delta; w += server_lr * v``.
    Other arguments are :class:`FedAvg`'s."""
    return FedAvg(server_optimizer=ServerSGD(lr=server_lr, momentum=momentum), **kwargs)


def FedAdagrad(eta: float = 0.01, beta1: float = 0.0, tau: float = 1e-3, **kwargs: Any) -> FedAvg:  # noqa: N802
    """FedAdagrad (Reddi et al. 2021, "Adaptive Federated Optimization"): server learning rate ``eta``,
    adaptivity ``tau``; the clients' learning rate is ``fit.lr``. Other arguments are :class:`FedAvg`'s."""
    return FedAvg(server_optimizer=Adagrad(eta=eta, beta1=beta1, tau=tau), **kwargs)


def FedAdam(  # noqa: N802
    eta: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, **kwargs: Any
) -> FedAvg:
    """FedAdam (Reddi et al. 2021): Adam on the server over the clients' mean update. Other arguments are
    :class:`FedAvg`'s."""
    return FedAvg(server_optimizer=Adam(eta=eta, beta1=beta1, beta2=beta2, tau=tau), **kwargs)


def FedYogi(  # noqa: N802
    eta: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, **kwargs: Any
) -> FedAvg:
    """FedYogi (Reddi et al. 2021): Yogi on the server, whose second moment grows more cautiously than
    Adam's. Other arguments are :class:`FedAvg`'s."""
    return FedAvg(server_optimizer=Yogi(eta=eta, beta1=beta1, beta2=beta2, tau=tau), **kwargs)
