"""What most strategies share: which clients train and evaluate each round, and what they are told."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedloom.core.config import FitConfig
from fedloom.core.counting import share_of
from fedloom.core.errors import ConfigError, NotEnoughClientsError
from fedloom.core.message import Message
from fedloom.core.params import Params
from fedloom.core.results import EvalResult, evaluate_message, fit_message
from fedloom.strategy.aggregate import weighted_mean_scalar
from fedloom.strategy.local import FINETUNE, with_local

__all__ = ["DEFAULT_MAX_SHARE", "DEFAULT_UPDATE_GUARD", "ClientSampling", "check_screening", "sample_clients"]

#: The default multiple of the round's median update norm above which an update is refused. Honest updates of
#: one round differ by a few times at most (sites of different sizes take different numbers of steps); an
#: update scaled to take over the model is orders of magnitude beyond that.
DEFAULT_UPDATE_GUARD = 10.0

#: The default cap on one site's share of a round's weight: none. A cap changes FedAvg's weights in honest
#: federations too (one hospital holding most of the data is common), so it is a policy a federation chooses;
#: what a deployed site joined with (its declared examples) bounds its weight whatever this says. ``0.5`` (no site
#: outweighs all the others together) suits federations whose sites' declared sizes are not checked.
DEFAULT_MAX_SHARE: float | None = None


def check_screening(update_guard: float | None, max_share: float | None) -> None:
    """Raise :class:`ConfigError` unless ``update_guard`` is ``None`` or > 1 and ``max_share`` is ``None`` or in
    ``(0, 1)``."""
    if update_guard is not None and not (isinstance(update_guard, (int, float)) and update_guard > 1):
        raise ConfigError(f"update_guard must be a number > 1 (or None to turn the guard off), got {update_guard!r}")
    if max_share is not None and not (isinstance(max_share, (int, float)) and 0 < max_share < 1):
        raise ConfigError(f"max_share must be in (0, 1) (or None for no cap), got {max_share!r}")


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
class ClientSampling:
    """The round structure of FedAvg (McMahan et al. 2017) that most algorithms keep: who is asked, and how
    they train and are evaluated. Strategies derive from it and add their own aggregation.

    Each round a fraction ``fraction`` (C) of the K clients is sampled (``clients_per_round``, where given,
    replaces the fraction: that many clients, all of them if fewer are available, as in cross-device FL), and
    each trains locally as ``fit`` says (E epochs or S steps, batch B, learning rate, FedProx's
    ``proximal_mu``). ``work_range=(lo, hi)`` gives every sampled client its own amount of local work each
    round, drawn uniformly from ``lo..hi``: epochs, or steps where ``fit`` counts steps; FedProx's experiments
    model systems heterogeneity so (stragglers run 1 to E epochs).
    ``min_clients`` is both the fewest clients sampled and the fewest replies a round accepts. Federated
    evaluation asks a fraction ``fraction_evaluate`` of clients (0 turns it off) for their held-out loss and
    metrics: ``federated_loss`` and ``federated_<metric>`` weight them by held-out example counts,
    ``client_mean_accuracy`` is the plain mean of the clients' accuracies (each client counts once, as in
    personalization papers). Each client's own numbers are in the round's client records.

    ``finetune``, where given, makes evaluation personal by local fine-tuning: each evaluated client first
    trains the global model on its own training split as ``finetune`` says, and reports the fine-tuned model's
    loss and metrics on its test split, with the global model's beside them (``global_loss``,
    ``global_accuracy``); the fine-tuned model is thrown away.

    Two bounds on what one dishonest site can do with a well-formed update, which the server loop applies the
    same way in simulation and deployment (:mod:`fedloom.runtime.screening`): ``update_guard`` (default 10)
    refuses an update whose norm of change is more than that many times the round's median, and changes nothing
    in a round where no update is that far out; ``max_share`` (default ``None``: off) caps any one site's share of
    the round's weight, where more than ``1 / max_share`` sites replied (``0.5`` for federations whose sites'
    declared sizes are not checked). With both ``None``, updates are aggregated as they arrive instead of held
    until the round's last is in.
    """

    fraction: float = 1.0
    min_clients: int = 1
    fraction_evaluate: float = 1.0
    fit: FitConfig = field(default_factory=FitConfig)
    clients_per_round: int | None = None
    work_range: tuple[int, int] | None = None
    finetune: FitConfig | None = None
    update_guard: float | None = DEFAULT_UPDATE_GUARD
    max_share: float | None = DEFAULT_MAX_SHARE

    def __post_init__(self) -> None:
        check_screening(self.update_guard, self.max_share)
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
        if isinstance(self.finetune, Mapping):  # from JSON (fedloom simulate --strategy-arg finetune={...})
            try:
                object.__setattr__(self, "finetune", FitConfig(**self.finetune))
            except TypeError as exc:
                raise ConfigError(f"finetune: {exc}") from None
        if self.finetune is not None and not isinstance(self.finetune, FitConfig):
            raise ConfigError(f"finetune must be a FitConfig, got {self.finetune!r}")
        if self.work_range is not None:
            steps = tuple(self.work_range)
            if len(steps) != 2 or not all(isinstance(s, int) and s >= 1 for s in steps) or steps[0] > steps[1]:
                raise ConfigError(f"work_range must be (lo, hi) with 1 <= lo <= hi, got {self.work_range!r}")
            object.__setattr__(self, "work_range", steps)

    def fit_instructions(
        self, server_round: int, params: Params, clients: Sequence[str], rng: np.random.Generator
    ) -> dict[str, Message]:
        """Sample this round's clients and tell each to train ``params``, with a seed of its own."""
        selected = sample_clients(clients, self.fraction, self.min_clients, rng, self.clients_per_round)
        configs = self.fit_configs(len(selected), rng)
        return {cid: fit_message(server_round, params, config) for cid, config in zip(selected, configs, strict=True)}

    def fit_configs(self, count: int, rng: np.random.Generator) -> list[FitConfig]:
        """``count`` clients' local training: ``fit`` with a seed of each client's own, and its own amount of
        work where ``work_range`` says so."""
        seeds = rng.integers(0, 2**31 - 1, size=count)
        configs = [replace(self.fit, seed=int(seed)) for seed in seeds]
        if self.work_range is not None:
            lo, hi = self.work_range
            work = [int(w) for w in rng.integers(lo, hi + 1, size=count)]
            unit = "local_steps" if self.fit.local_steps is not None else "local_epochs"
            configs = [replace(c, **{unit: w}) for c, w in zip(configs, work, strict=True)]
        return configs

    def configure_fit(
        self, server_round: int, state: Any, clients: Sequence[str], rng: np.random.Generator
    ) -> dict[str, Message]:
        """The sampled clients, each told to train the global model (:meth:`fit_instructions`)."""
        return self.fit_instructions(server_round, self.params(state), clients, rng)

    def params(self, state: Any) -> Params:
        """The global model held in ``state`` (its ``params``)."""
        held: Params = state.params
        return held

    def configure_evaluate(
        self, server_round: int, state: Any, clients: Sequence[str], rng: np.random.Generator
    ) -> dict[str, Message]:
        if self.fraction_evaluate == 0.0 or not clients:
            return {}
        count = None
        if self.clients_per_round is not None:  # cross-device: never ask more clients than train in a round
            count = min(self.clients_per_round, max(share_of(self.fraction_evaluate, len(clients)), 1))
        selected = sample_clients(clients, self.fraction_evaluate, 1, rng, count)
        message = evaluate_message(server_round, self.params(state))
        if self.finetune is not None:
            message = with_local(message, FINETUNE, fit=self.finetune.to_metadata())
        return dict.fromkeys(selected, message)

    def aggregate_evaluate(self, server_round: int, state: Any, results: Mapping[str, EvalResult]) -> dict[str, float]:
        scored = [r for r in results.values() if r.num_examples > 0]
        if not scored:
            return {}
        counts = [r.num_examples for r in scored]
        metrics = {"federated_loss": weighted_mean_scalar([r.loss for r in scored], counts)}
        shared = set.intersection(*(set(r.metrics) for r in scored))
        for name in sorted(shared):
            metrics[f"federated_{name}"] = weighted_mean_scalar([r.metrics[name] for r in scored], counts)
        if "accuracy" in shared:
            metrics["client_mean_accuracy"] = float(np.mean([r.metrics["accuracy"] for r in scored]))
        return metrics
