"""Central, user-level differential privacy for federated averaging: DP-FedAvg (McMahan, Ramage, Talwar, Zhang
2018, "Learning Differentially Private Recurrent Language Models") with fixed or adaptive clipping (Andrew,
Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning with Adaptive Clipping"), accounted by
dp-accounting (:mod:`fedloom.privacy.accounting`).

The server is trusted with the individual updates (central DP); what it releases, the model after each round,
is differentially private with respect to any one client's whole data (user-level).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedloom.core.errors import ConfigError, StopRunError
from fedloom.core.message import Message
from fedloom.core.params import Params
from fedloom.core.results import EvalResult, FitResult, fit_message
from fedloom.privacy.accounting import ACCOUNTANTS, Accountant, epsilon
from fedloom.privacy.updates import summable
from fedloom.strategy.aggregate import f64, fit_loss
from fedloom.strategy.base import SummableStrategy
from fedloom.strategy.fedavg import FedAvg
from fedloom.strategy.robust import l2_norm

__all__ = ["DPFedAvg", "DPState"]


@dataclass(frozen=True)
class DPState:
    """The global model after ``server_round`` rounds, the server optimizer's state, the clipping norm the next
    round uses (it moves with adaptive clipping) and how many rounds have spent privacy."""

    params: Params
    server_round: int = 0
    optimizer: Params = field(default_factory=lambda: Params({}))
    clip: float = 1.0
    rounds_spent: int = 0


@dataclass(frozen=True)
class DPFedAvg:
    """DP-FedAvg around any strategy whose aggregate is a weighted sum of its clients' updates (``strategy``, a
    :class:`~fedloom.strategy.base.SummableStrategy`: FedAvg, FedProx, FedAvgM, FedAdagrad/FedAdam/FedYogi),
    which gives the clients' local training, evaluation and the server optimizer; ``strategy.fraction`` is the
    sampling rate q.

    Each round:

    1. **Poisson sampling**: every client takes part independently with probability q (what the accountant
       assumes), so a round may ask none.
    2. Each update ``w_k - w`` is clipped to L2 norm ``C`` (the whole model), on the server.
    3. The clipped updates are summed, Gaussian noise of standard deviation ``z * C`` is added to the sum, and
       the sum is divided by the *expected* number of clients ``q * n`` (McMahan et al.'s fixed-denominator
       estimator, whose sensitivity does not depend on who took part).
    4. The noised mean is the server optimizer's pseudo-gradient (or is added to the model without one).

    With ``target_quantile`` (gamma) the clip adapts (Andrew et al. 2021): each round the server counts the
    updates with norm at most ``C``, adds Gaussian noise of standard deviation ``count_stddev`` (default
    ``q n / 20``) to the count, and sets ``C <- C * exp(-clip_lr * (count / (q n) - gamma))``. The update's noise
    multiplier is then raised to ``(z^-2 - (2 count_stddev)^-2)^(-1/2)`` so that the two releases together cost
    what ``z`` alone would: the accountant charges ``z`` per round either way.

    Every round records ``epsilon`` (spent so far, at ``delta``, by ``accountant``: ``rdp`` or ``pld``),
    ``dp_clip`` (the clip used) and ``dp_clients`` (how many were sampled). With ``target_epsilon`` the run
    ends, with a message, before the round that would spend more (:class:`~fedloom.core.errors.StopRunError`).
    ``delta`` must be below 1/n. The noise comes from the operating system's entropy each round, so nobody can
    subtract it; ``noise_seed`` makes it reproducible, for experiments only.

    ``num_clients`` is n, the number of clients the federation samples from.

    >>> dp = DPFedAvg(FedAvg(fraction=0.1), num_clients=1000, clip_norm=1.0, noise_multiplier=1.1)
    """

    strategy: SummableStrategy[Any] = field(default_factory=FedAvg)
    num_clients: int = 0
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    target_quantile: float | None = None
    clip_lr: float = 0.2
    count_stddev: float | None = None
    delta: float = 1e-5
    target_epsilon: float | None = None
    accountant: Accountant = "rdp"
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        summable(self.strategy, "DPFedAvg")  # the capability, not a class: FedBuff, FedPer, Ditto say why not
        if self.strategy.clip_norm is not None:
            raise ConfigError("DPFedAvg clips and averages itself: give its strategy no aggregator and no clip_norm")
        if getattr(self.strategy, "clients_per_round", None) is not None:
            raise ConfigError(
                "DPFedAvg samples each client with probability `fraction`; clients_per_round does not apply"
            )
        if not isinstance(self.num_clients, int) or self.num_clients < 1:
            raise ConfigError(
                f"DPFedAvg needs num_clients, the number of clients n (>= 1), got {self.num_clients!r}: the noised "
                "sum is divided by the expected number of clients q n, and delta must be below 1/n"
            )
        if self.delta >= 1.0 / self.num_clients:
            raise ConfigError(
                f"delta={self.delta:g} must be below 1/{self.num_clients} (one over the number of clients)"
            )
        if not self.clip_norm > 0:
            raise ConfigError(f"clip_norm must be > 0, got {self.clip_norm}")
        if not self.noise_multiplier > 0:
            raise ConfigError(f"noise_multiplier must be > 0 (no noise is no privacy), got {self.noise_multiplier}")
        if self.target_quantile is not None and not 0.0 < self.target_quantile < 1.0:
            raise ConfigError(f"target_quantile must be in (0, 1), got {self.target_quantile}")
        if not self.clip_lr > 0:
            raise ConfigError(f"clip_lr must be > 0, got {self.clip_lr}")
        if self.count_stddev is not None and not self.count_stddev > 0:
            raise ConfigError(f"count_stddev must be > 0, got {self.count_stddev}")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ConfigError(f"target_epsilon must be > 0, got {self.target_epsilon}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}")
        if self.target_quantile is not None and self.update_noise_multiplier(1) is None:
            raise ConfigError("count_stddev is too small for noise_multiplier: (2 count_stddev) must exceed it")

    @property
    def min_clients(self) -> int:
        return 0  # Poisson sampling may pick nobody; the round still adds its noise

    @property
    def sample_rate(self) -> float:
        return self.strategy.fraction

    def init(self, params: Params) -> DPState:
        return DPState(params, 0, self.strategy.server_init(params), self.clip_norm)

    def params(self, state: DPState) -> Params:
        return state.params

    def spent(self, rounds: int) -> float:
        """Epsilon at ``delta`` after ``rounds`` rounds."""
        return epsilon(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            rounds=rounds,
            delta=self.delta,
            accountant=self.accountant,
        )

    def configure_fit(
        self, server_round: int, state: DPState, clients: Sequence[str], rng: np.random.Generator
    ) -> dict[str, Message]:
        if self.target_epsilon is not None:
            after = self.spent(state.rounds_spent + 1)
            if after > self.target_epsilon:
                so_far = self.spent(state.rounds_spent)
                raise StopRunError(
                    f"round {server_round} would bring epsilon to {after:.3f} at delta {self.delta:g}, over the "
                    f"target {self.target_epsilon:g}; {state.rounds_spent} rounds spent {so_far:.3f}"
                )
        chosen = np.flatnonzero(rng.random(len(clients)) < self.sample_rate)
        configs = self.strategy.fit_configs(len(chosen), rng)
        return {
            clients[int(k)]: fit_message(server_round, state.params, config)
            for k, config in zip(chosen, configs, strict=True)
        }

    def aggregate_fit(
        self, server_round: int, state: DPState, results: Mapping[str, FitResult]
    ) -> tuple[DPState, dict[str, float]]:
        x = state.params
        total = {name: np.zeros(x[name].shape, np.float64) for name in x}
        within = 0
        for result in results.values():
            update = Params({n: f64(result.params[n]) - f64(x[n]) for n in x}, copy=False)
            norm = l2_norm(update)
            within += int(norm <= state.clip)
            scale = min(1.0, state.clip / norm) if norm > 0 else 1.0  # clipped to C, as it is added in
            for name in total:
                total[name] += f64(update[name]) * scale
        noise = self._noise(server_round)
        expected = self.sample_rate * self.num_clients
        sigma = (self.update_noise_multiplier(expected) or self.noise_multiplier) * state.clip
        noised = {n: t + noise.normal(0.0, sigma, t.shape) for n, t in total.items()}
        count = None
        if self.target_quantile is not None:  # Andrew et al.: the noised share of updates within the clip
            count = within + noise.normal(0.0, self._count_stddev(expected))
        state, metrics = self.release(server_round, state, Params(noised, copy=False), len(results), count)
        return state, {**fit_loss(list(results.values())), **metrics}

    def release(
        self, server_round: int, state: DPState, noised_sum: Params, clients: int, noised_count: float | None = None
    ) -> tuple[DPState, dict[str, float]]:
        """The state after round ``server_round`` from the noised sum of the clipped updates (divided here by
        the expected number of clients ``q n``) and, with adaptive clipping, the noised count of updates within
        the clip; ``clients`` is how many took part. Used by :meth:`aggregate_fit`, and by secure aggregation
        with distributed noise (:class:`fedloom.privacy.SecAgg`), where the clients clip and noise and the
        server learns only the noised sum."""
        x = state.params
        expected = self.sample_rate * self.num_clients
        mean = Params({n: f64(noised_sum[n]) / expected for n in x}, copy=False)
        params, opt_state = self.strategy.server_step(x, mean, state.optimizer)
        clip = state.clip
        if noised_count is not None:
            clip = clip * math.exp(-self.clip_lr * (noised_count / expected - self._target_quantile()))
        spent = state.rounds_spent + 1
        metrics = {"epsilon": self.spent(spent), "dp_clip": state.clip, "dp_clients": float(clients)}
        metrics["dp_noise_multiplier"] = self.noise_multiplier
        metrics["dp_delta"] = self.delta
        return DPState(params, server_round, opt_state, clip, spent), metrics

    def _target_quantile(self) -> float:
        if self.target_quantile is None:
            raise ConfigError("a noised count is for adaptive clipping, and this DPFedAvg has no target_quantile")
        return self.target_quantile

    def update_noise_multiplier(self, expected_clients: float) -> float | None:
        """The update's noise multiplier: ``z`` with fixed clipping; with adaptive clipping the larger one that
        leaves room for the count's noise (``None`` when ``count_stddev`` leaves no room)."""
        if self.target_quantile is None:
            return self.noise_multiplier
        rest = self.noise_multiplier**-2 - (2 * self._count_stddev(expected_clients)) ** -2
        return rest**-0.5 if rest > 0 else None

    def _count_stddev(self, expected_clients: float) -> float:
        return self.count_stddev if self.count_stddev is not None else max(expected_clients / 20.0, 1e-12)

    def _noise(self, server_round: int) -> np.random.Generator:
        if self.noise_seed is None:
            return np.random.default_rng(secrets.randbits(128))
        return np.random.default_rng([self.noise_seed, server_round])

    def configure_evaluate(
        self, server_round: int, state: DPState, clients: Sequence[str], rng: np.random.Generator
    ) -> dict[str, Message]:
        return self.strategy.configure_evaluate(server_round, state, clients, rng)

    def aggregate_evaluate(
        self, server_round: int, state: DPState, results: Mapping[str, EvalResult]
    ) -> dict[str, float]:
        return self.strategy.aggregate_evaluate(server_round, state, results)
