"""Decentralized FL in simulation: every client trains its own model and gossips it with its neighbours.

There is no server and no global model. Each round, every client trains locally from its own model, then all
models are mixed over the communication graph (:func:`fedloom.strategy.gossip.gossip_step`), as D-PSGD does
(Lian et al. 2017). All clients run in this process, one after another.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import numpy as np

from fedloom.core.config import FitConfig
from fedloom.core.errors import ConfigError, InvalidUpdateError, user_code
from fedloom.core.graphs import mixing_matrix, spectral_gap
from fedloom.core.graphs import topology as build_topology
from fedloom.core.params import Params
from fedloom.core.validation import check_update
from fedloom.data.base import Federation
from fedloom.strategy.aggregate import weighted_mean
from fedloom.strategy.gossip import consensus_distance, gossip_step
from fedloom.task.base import Task

__all__ = ["MAX_GOSSIP_CLIENTS", "GossipResult", "GossipRound", "run_gossip"]

# The simulation holds every client's model and a dense n x n mixing matrix (8 n^2 bytes): 200 MB at 5,000.
MAX_GOSSIP_CLIENTS = 5_000


@dataclass(frozen=True)
class GossipRound:
    """One finished round of gossip.

    - ``client_loss`` / ``client_accuracy``: the unweighted mean over clients of each client's own model's loss
      and accuracy on its own test split (clients with an empty one left out); ``None`` in rounds without
      evaluation, where no client has test data, or (accuracy) where the task reports none.
    - ``central_loss`` / ``central_accuracy``: the average model's on the federation's central test set, where
      it has one (and the round was evaluated).
    - ``consensus_distance``: the mean over clients of ``||x_i - x_mean||^2`` after mixing, over the models'
      floating-point arrays (0: all agree).
    - ``fit_loss``: the unweighted mean of the clients' training loss, where every client reported one.
    - ``seconds``: wall time of the round, evaluation included.
    """

    round: int
    consensus_distance: float
    seconds: float
    fit_loss: float | None = None
    client_loss: float | None = None
    client_accuracy: float | None = None
    central_loss: float | None = None
    central_accuracy: float | None = None


@dataclass(frozen=True)
class GossipResult:
    """What a gossip run produced: each client's final model (by client id, in order), their unweighted
    average, the topology and its mixing speed, and every round's record."""

    models: Mapping[str, Params]
    average: Params
    history: tuple[GossipRound, ...]
    topology: str
    spectral_gap: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", MappingProxyType(dict(self.models)))

    @property
    def final(self) -> GossipRound:
        """The last round's record."""
        return self.history[-1]


def run_gossip(
    task: Task,
    federation: Federation,
    *,
    topology: str,
    degree: int | None,
    rounds: int,
    fit: FitConfig,
    seed: int,
    evaluate_every: int = 1,
    progress: Callable[[GossipRound], None] | None = None,
) -> GossipResult:
    """Run decentralized FL over ``federation``'s clients for ``rounds`` rounds and return the final models.

    Every client starts from ``task.init_params(seed)`` (the same model, as in D-PSGD). Each round every client
    trains locally from its own model as ``fit`` says, with a seed of its own for the round drawn from
    ``seed``; then every model becomes the Metropolis-Hastings-weighted average of its own and its neighbours'
    (``topology``: ``ring``, ``regular`` with ``degree``, or ``full``; a regular graph is drawn from ``seed``).
    Clients are evaluated every ``evaluate_every`` rounds and after the last; ``progress`` sees each round's
    record. The same seed and data give the same models.

    Raises :class:`ConfigError` for settings out of range, an unknown topology, or more than
    :data:`MAX_GOSSIP_CLIENTS` clients; :class:`InvalidUpdateError` when a client's trained model does not fit
    the model (names, shapes, dtypes) or holds NaN or infinity; :class:`JobError` when the task raises.
    """
    for name, value, least in (("rounds", rounds, 1), ("evaluate_every", evaluate_every, 1), ("seed", seed, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f"{name} must be a whole number >= {least}, got {value!r}")
    if not isinstance(fit, FitConfig):
        raise ConfigError(f"fit must be a FitConfig, got {type(fit).__name__}")
    client_ids = list(federation.client_ids)
    if not 1 <= len(client_ids) <= MAX_GOSSIP_CLIENTS:
        raise ConfigError(f"gossip simulates 1 to {MAX_GOSSIP_CLIENTS} clients, got {len(client_ids)}")
    graph_seed, fit_seed = np.random.SeedSequence(seed).spawn(2)
    adjacency = build_topology(topology, len(client_ids), degree=degree, rng=np.random.default_rng(graph_seed))
    W = mixing_matrix(adjacency)
    gap = spectral_gap(W)
    fit_rng = np.random.default_rng(fit_seed)
    with user_code("the model (init_params)"):
        initial = task.init_params(seed)
    models = [initial] * len(client_ids)
    history: list[GossipRound] = []
    for round_number in range(1, rounds + 1):
        start = time.perf_counter()
        seeds = fit_rng.integers(0, 2**31 - 1, size=len(client_ids))
        trained: list[Params] = []
        losses: list[float] = []
        for cid, model, client_seed in zip(client_ids, models, seeds, strict=True):
            updated, loss = _fit(task, federation, cid, model, replace(fit, seed=int(client_seed)), round_number)
            trained.append(updated)
            losses += [] if loss is None else [loss]
        models = gossip_step(trained, W)
        distance = consensus_distance(models)
        evaluated = {}
        if round_number % evaluate_every == 0 or round_number == rounds:
            evaluated = _evaluate(task, federation, client_ids, models)
        record = GossipRound(
            round=round_number,
            consensus_distance=distance,
            seconds=time.perf_counter() - start,
            fit_loss=math.fsum(losses) / len(losses) if len(losses) == len(models) else None,
            **evaluated,
        )
        history.append(record)
        if progress is not None:
            progress(record)
    return GossipResult(dict(zip(client_ids, models, strict=True)), _average(models), tuple(history), topology, gap)


def _fit(
    task: Task, federation: Federation, cid: str, model: Params, config: FitConfig, round_number: int
) -> tuple[Params, float | None]:
    """Client ``cid``'s model after local training, and its training loss where it reports one. A client with
    no training data keeps its model."""
    train = federation.clients[cid].train
    if not len(train):
        return model, None
    with user_code(f"client {cid} in fit"):
        result = task.fit(model, train, config)
    try:
        check_update(model, result.params)
    except InvalidUpdateError as exc:
        raise InvalidUpdateError(f"round {round_number}: client {cid}'s trained model: {exc}") from None
    loss = result.metrics.get("loss")
    return result.params, None if loss is None else float(loss)


def _evaluate(task: Task, federation: Federation, client_ids: list[str], models: list[Params]) -> dict[str, Any]:
    """The mean of each client's own model on its own test split, and the average model on the central test."""
    out: dict[str, Any] = {}
    losses, accuracies = [], []
    for cid, model in zip(client_ids, models, strict=True):
        test = federation.clients[cid].test
        if not len(test):
            continue
        with user_code(f"client {cid} in evaluate"):
            result = task.evaluate(model, test)
        losses.append(result.loss)
        if "accuracy" in result.metrics:
            accuracies.append(result.metrics["accuracy"])
    if losses:
        out["client_loss"] = math.fsum(losses) / len(losses)
    if accuracies and len(accuracies) == len(losses):
        out["client_accuracy"] = math.fsum(accuracies) / len(accuracies)
    central = federation.central_test
    if central is not None and len(central):
        with user_code("central evaluation of the average model"):
            result = task.evaluate(_average(models), central)
        out["central_loss"] = result.loss
        if "accuracy" in result.metrics:
            out["central_accuracy"] = result.metrics["accuracy"]
    return out


def _average(models: list[Params]) -> Params:
    """The unweighted mean of the clients' models, in the models' dtypes (what gossip converges to)."""
    return weighted_mean(models, [1.0] * len(models))
