"""FedBuff, as Algorithm 1 of Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation":
the server keeps a number of clients training at all times and updates the global model every K updates, each
discounted by how stale the model its client started from is."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedloom.core.errors import ConfigError, NotEnoughClientsError
from fedloom.core.message import Message
from fedloom.core.params import Params
from fedloom.core.results import FitResult, fit_message
from fedloom.strategy.aggregate import RunningMean, f64, weighted_mean_scalar
from fedloom.strategy.fedavg import FedAvg, FedAvgState

__all__ = ["FedBuff", "staleness_weight"]


def staleness_weight(staleness: int, exponent: float) -> float:
    """``(1 + staleness) ** -exponent``: FedBuff's discount of an update whose client started ``staleness``
    server updates ago (``exponent=0.5`` is the paper's ``1 / sqrt(1 + staleness)``; 0 weighs all alike)."""
    return float((1.0 + staleness) ** -exponent)


@dataclass(frozen=True)
class FedBuff(FedAvg):
    """Buffered asynchronous aggregation. ``concurrency`` clients train at once, each on the newest global model
    when it starts; whenever one finishes, another (drawn uniformly from the idle clients) starts. Every
    ``buffer_size`` (K) updates the server steps::

        w <- w + server_lr * sum_k n_k s(tau_k) (w_k - w_start_k) / sum_k n_k

    where ``w_start_k`` is the model client k started from, ``n_k`` its number of training examples and
    ``s(tau) = (1 + tau) ** -staleness_exponent`` discounts an update made on a model ``tau`` server steps old
    (:func:`staleness_weight`). With equal ``n_k`` this is the paper's ``1/K`` sum. Updates staler than
    ``max_staleness`` are refused. Each server step is one round of the run: ``rounds`` is the number of steps.

    FedAvg's server-side pieces compose with it: ``clip_norm`` bounds each update, ``aggregator`` replaces
    the weighted sum by a robust rule over the discounted updates, and ``server_optimizer`` (then
    ``server_lr`` must stay 1) takes the buffered update as its pseudo-gradient. ``fit``, ``work_range``,
    ``fraction_evaluate`` and ``finetune`` mean what they mean for FedAvg; ``fraction`` and
    ``clients_per_round`` do not apply (``concurrency`` replaces them). Federated evaluation, where asked for,
    asks clients that are not training at the time.

    It runs on any grid: a simulated one with client speeds (``SystemConfig``) moves a simulated clock, and a
    deployment's clients need nothing new (each just trains when told to).

    >>> strategy = FedBuff(buffer_size=10, concurrency=50, fit=FitConfig(local_epochs=1, lr=0.05))
    """

    buffer_size: int = 10
    concurrency: int = 20
    server_lr: float = 1.0
    staleness_exponent: float = 0.5
    max_staleness: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("buffer_size", "concurrency"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.server_lr > 0:
            raise ConfigError(f"server_lr must be > 0, got {self.server_lr}")
        if not self.staleness_exponent >= 0:
            raise ConfigError(f"staleness_exponent must be >= 0, got {self.staleness_exponent}")
        if self.max_staleness is not None and (not isinstance(self.max_staleness, int) or self.max_staleness < 0):
            raise ConfigError(f"max_staleness must be an integer >= 0, got {self.max_staleness!r}")
        if self.server_optimizer is not None and self.server_lr != 1.0:
            raise ConfigError("server_lr scales the update of plain FedBuff; with a server_optimizer, set its lr")
        if self.fraction != 1.0 or self.clients_per_round is not None:
            raise ConfigError(
                "FedBuff keeps `concurrency` clients training at all times; fraction and clients_per_round do not "
                "apply to it"
            )

    def summable(self) -> str | None:
        """Why a protected sum cannot stand in for FedBuff's aggregation: it is asynchronous."""
        return (
            "FedBuff is asynchronous: each server step sums a buffer of updates made on different models, "
            "weighted by their staleness, as they arrive one at a time, never a round's cohort"
        )

    def instruct(self, version: int, state: FedAvgState, client_id: str, rng: np.random.Generator) -> Message:
        """Train the global model now held (after ``version`` server steps), with a seed of this client's own."""
        (config,) = self.fit_configs(1, rng)
        return fit_message(version + 1, self.params(state), config)

    def buffer(self, server_round: int, state: FedAvgState) -> _Buffer:
        return _Buffer(self, server_round, state)


class _Buffer:
    """FedBuff's buffer: the example-and-staleness-weighted sum of the updates so far (or, for a robust
    ``aggregator``, the discounted updates themselves), and their training losses."""

    def __init__(self, strategy: FedBuff, server_round: int, state: FedAvgState) -> None:
        self._strategy = strategy
        self._round = server_round
        self._state = state
        self._sum = RunningMean()  # sum_k n_k s_k d_k / sum_k n_k s_k
        self._updates: list[Params] = []  # s_k d_k, kept only for a robust aggregator
        self._examples: list[int] = []
        self._discounted = 0.0  # sum_k n_k s_k
        self._losses: list[tuple[float, int]] = []

    @property
    def count(self) -> int:
        return len(self._examples)

    def add(self, client_id: str, result: FitResult, base: Params, staleness: int) -> None:
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        discount = staleness_weight(staleness, self._strategy.staleness_exponent)
        update = self._strategy._update(base, result.params)
        if self._strategy.aggregator is not None:
            self._updates.append(Params({n: f64(a) * discount for n, a in update.items()}, copy=False))
        else:
            self._sum.add(update, result.num_examples * discount)
        self._examples.append(result.num_examples)
        self._discounted += result.num_examples * discount
        if "loss" in result.metrics:
            self._losses.append((result.metrics["loss"], result.num_examples))

    def finish(self) -> tuple[FedAvgState, dict[str, float]]:
        strategy = self._strategy
        examples = sum(self._examples)
        if not self._examples or examples <= 0:
            raise NotEnoughClientsError(f"round {self._round}: no update with training examples in the buffer")
        if strategy.aggregator is not None:
            delta = strategy.aggregator(self._updates, self._examples)
            scale = strategy.server_lr
        else:
            delta = self._sum.result()
            scale = strategy.server_lr * self._discounted / examples
        delta = Params({n: f64(a) * scale for n, a in delta.items()}, copy=False)
        metrics = {}
        if self._losses and len(self._losses) == len(self._examples):
            losses, counts = zip(*self._losses, strict=True)
            metrics["fit_loss"] = weighted_mean_scalar(losses, counts)
        return strategy._advance(self._round, self._state, delta=delta), metrics
