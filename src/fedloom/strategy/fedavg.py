"""FedAvg, as Algorithm 1 of McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data"."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from fedloom.core.config import FitConfig
from fedloom.core.counting import share_of
from fedloom.core.errors import ConfigError, NotEnoughClientsError
from fedloom.core.message import Message
from fedloom.core.params import Params
from fedloom.core.results import EvalResult, FitResult, evaluate_message, fit_message
from fedloom.strategy.aggregate import RunningMean, weighted_mean_scalar

__all__ = ["FedAvg", "FedAvgState", "sample_clients"]


def sample_clients(
    clients: Sequence[str], fraction: float, minimum: int, rng: np.random.Generator, count: int | None = None
) -> list[str]:
    """Pick ``max(floor(fraction * K), minimum, 1)`` of the ``K`` clients (or ``count`` of them, where given)
    uniformly without replacement.

    The result keeps the order of ``clients``. Raises :class:`NotEnoughClientsError` if ``K < minimum``.
    """
    if len(clients) < minimum:
        raise NotEnoughClientsError(f"{len(clients)} clients are available but at least {minimum} are needed")
    wanted = count if count is not None else max(share_of(fraction, len(clients)), minimum, 1)
    m = min(len(clients), wanted)
    chosen = rng.choice(len(clients), size=m, replace=False)
    return [clients[i] for i in sorted(chosen)]


@dataclass(frozen=True)
class FedAvgState:
    """The global model after ``server_round`` rounds."""

    params: Params
    server_round: int = 0


class _FedAvgFold:
    """FedAvg's aggregation of one round, one update at a time: the example-weighted mean of the params and of
    the reported training losses."""

    def __init__(self, server_round: int) -> None:
        self._round = server_round
        self._mean = RunningMean()
        self._losses: list[tuple[float, int]] | None = []

    def add(self, client_id: str, result: FitResult) -> None:
        self._mean.add(result.params, result.num_examples)
        if self._losses is not None and "loss" in result.metrics:
            self._losses.append((result.metrics["loss"], result.num_examples))
        else:
            self._losses = None  # a client without a loss: no fit_loss this round

    def finish(self) -> tuple[FedAvgState, dict[str, float]]:
        if not self._mean.count:
            raise NotEnoughClientsError(f"round {self._round}: no client returned an update")
        try:
            new = self._mean.result()
        except ConfigError:
            raise NotEnoughClientsError(f"round {self._round}: the clients that replied have no examples") from None
        metrics = {}
        if self._losses:
            losses, counts = zip(*self._losses, strict=True)
            metrics["fit_loss"] = weighted_mean_scalar(losses, counts)
        return FedAvgState(new, self._round), metrics


@dataclass(frozen=True)
class FedAvg:
    """Federated averaging.

    Each round a fraction ``fraction`` (C) of the K clients is sampled, each runs ``fit`` (E local epochs or
    S steps of minibatch SGD with batch size B and learning rate from ``fit``) from the global model, and the
    new global model is ``sum_k n_k / n * w_k`` over the clients that replied, ``n_k`` being each client's
    number of training examples. ``min_clients`` is both the fewest clients sampled and the fewest replies a
    round accepts. ``clients_per_round``, where given, replaces the fraction: that many clients are sampled
    from those available (all of them if fewer are), as in cross-device FL. Federated evaluation asks a
    fraction ``fraction_evaluate`` of clients for their held-out loss and accuracy, weighted by their
    held-out example counts (at most ``clients_per_round`` of them, where that is given); 0 turns it off.

    >>> strategy = FedAvg(fraction=0.1, fit=FitConfig(local_epochs=5, batch_size=10, lr=0.1))
    """

    fraction: float = 1.0
    min_clients: int = 1
    fraction_evaluate: float = 1.0
    fit: FitConfig = field(default_factory=FitConfig)
    clients_per_round: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ConfigError(f"fraction_evaluate must be in [0, 1], got {self.fraction_evaluate}")
        if self.min_clients < 1:
            raise ConfigError(f"min_clients must be >= 1, got {self.min_clients}")
        if self.clients_per_round is not None and self.clients_per_round < self.min_clients:
            raise ConfigError(
                f"clients_per_round must be >= min_clients={self.min_clients}, got {self.clients_per_round}"
            )

    def init(self, params: Params) -> FedAvgState:
        return FedAvgState(params)

    def params(self, state: FedAvgState) -> Params:
        return state.params

    def configure_fit(
        self, server_round: int, state: FedAvgState, clients: Sequence[str], rng: np.random.Generator
    ) -> dict[str, Message]:
        selected = sample_clients(clients, self.fraction, self.min_clients, rng, self.clients_per_round)
        seeds = rng.integers(0, 2**31 - 1, size=len(selected))
        return {
            cid: fit_message(server_round, state.params, replace(self.fit, seed=int(seed)))
            for cid, seed in zip(selected, seeds, strict=True)
        }

    def aggregate_fit(
        self, server_round: int, state: FedAvgState, results: Mapping[str, FitResult]
    ) -> tuple[FedAvgState, dict[str, float]]:
        fold = self.fold_fit(server_round, state)
        for client_id, result in results.items():
            fold.add(client_id, result)
        return fold.finish()

    def fold_fit(self, server_round: int, state: FedAvgState) -> _FedAvgFold:
        return _FedAvgFold(server_round)

    def configure_evaluate(
        self, server_round: int, state: FedAvgState, clients: Sequence[str], rng: np.random.Generator
    ) -> dict[str, Message]:
        if self.fraction_evaluate == 0.0 or not clients:
            return {}
        count = None
        if self.clients_per_round is not None:  # cross-device: never ask more clients than train in a round
            count = min(self.clients_per_round, max(share_of(self.fraction_evaluate, len(clients)), 1))
        selected = sample_clients(clients, self.fraction_evaluate, 1, rng, count)
        return {cid: evaluate_message(server_round, state.params) for cid in selected}

    def aggregate_evaluate(
        self, server_round: int, state: FedAvgState, results: Mapping[str, EvalResult]
    ) -> dict[str, float]:
        scored = [r for r in results.values() if r.num_examples > 0]
        if not scored:
            return {}
        counts = [r.num_examples for r in scored]
        metrics = {"federated_loss": weighted_mean_scalar([r.loss for r in scored], counts)}
        if all("accuracy" in r.metrics for r in scored):
            metrics["federated_accuracy"] = weighted_mean_scalar([r.metrics["accuracy"] for r in scored], counts)
        return metrics
