"""Decentralized FL in simulation: every client trains its own model and gossips it with its neighbours.

There is no server and no global model. Each round, every client trains locally from its own model, then all
models are mixed over the communication graph (:func:`fedloom.strategy.gossip.gossip_step`), as D-PSGD does
(Lian et al. 2017). All clients run in this process, one after another. Each round is also reported as the
server loop reports its rounds, a :class:`~fedloom.runtime.records.RoundRecord` and a model, to
:class:`~fedloom.runtime.records.RoundObserver` s (the run store's recorder among them): the model is the
average of the clients' models, which no client holds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import numpy as np

from fedloom.core.codec import encode_params
from fedloom.core.config import FitConfig
from fedloom.core.errors import ConfigError, InvalidUpdateError, user_code
from fedloom.core.graphs import mixing_matrix, spectral_gap
from fedloom.core.graphs import topology as build_topology
from fedloom.core.params import Params
from fedloom.core.validation import check_update
from fedloom.data.base import Federation
from fedloom.runtime.records import ClientRecord, ClientStatus, RoundObserver, RoundRecord
from fedloom.strategy.aggregate import weighted_mean
from fedloom.strategy.gossip import consensus_distance, gossip_step
from fedloom.task.base import Task

__all__ = ["MAX_GOSSIP_CLIENTS", "RECORDED_METRICS", "GossipResult", "GossipRound", "run_gossip"]

# The simulation holds every client's model and a dense n x n mixing matrix (8 n^2 bytes): 200 MB at 5,000.
MAX_GOSSIP_CLIENTS = 5_000

#: The metrics of a round's :class:`~fedloom.runtime.records.RoundRecord`, by the :class:`GossipRound` field each
#: comes from (where it is not ``None``), and ``spectral_gap``, the graph's, every round. The means over clients
#: take the names centralized runs give the same means, so the two kinds of run line up when compared.
RECORDED_METRICS = {
    "fit_loss": "fit_loss",
    "client_loss": "client_mean_loss",
    "client_accuracy": "client_mean_accuracy",
    "central_loss": "central_loss",
    "central_accuracy": "central_accuracy",
    "consensus_distance": "consensus_distance",
}


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
    initial_params: Params | None = None,
    progress: Callable[[GossipRound], None] | None = None,
    observers: Sequence[RoundObserver] = (),
) -> GossipResult:
    """Run decentralized FL over ``federation``'s clients for ``rounds`` rounds and return the final models.

    Every client starts from ``initial_params`` (by default ``task.init_params(seed)``): the same model, as in
    D-PSGD. Each round every client trains locally from its own model as ``fit`` says, with a seed of its own for
    the round drawn from ``seed``; then every model becomes the Metropolis-Hastings-weighted average of its own
    and its neighbours' (``topology``: ``ring``, ``regular`` with ``degree``, or ``full``; a regular graph is
    drawn from ``seed``). Clients are evaluated every ``evaluate_every`` rounds and after the last; ``progress``
    sees each round's record. The same seed and data give the same models.

    ``observers`` see each round as the server loop's do: a :class:`~fedloom.runtime.records.RoundRecord` whose
    metrics are :data:`RECORDED_METRICS`, with a ``fit`` record per client (its training loss, examples and
    seconds, and as bytes each way its model's encoding once per neighbour: what it sent its neighbours and got
    from them) and, in evaluated rounds, an ``evaluate`` record per client with test data (its own model on its
    own test split); and, as the params, the unweighted average of the clients' models after mixing.

    Raises :class:`ConfigError` for settings out of range, an unknown topology, or more than
    :data:`MAX_GOSSIP_CLIENTS` clients; :class:`InvalidUpdateError` when a client's trained model does not fit
    the model (names, shapes, dtypes) or holds NaN or infinity; :class:`JobError` when the task raises. An
    observer's error ends the run and is raised as it is.
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
    if initial_params is None:
        with user_code("the model (init_params)"):
            initial_params = task.init_params(seed)
    # Every model has the initial one's names, shapes and dtypes (each trained one is checked): one size for all.
    exchanged = [int(d) * len(encode_params(initial_params)) for d in adjacency.sum(axis=1)] if observers else []
    central = federation.central_test
    models = [initial_params] * len(client_ids)
    average: Params | None = None
    history: list[GossipRound] = []
    for round_number in range(1, rounds + 1):
        start = time.perf_counter()
        seeds = fit_rng.integers(0, 2**31 - 1, size=len(client_ids))
        trained: list[Params] = []
        fitted: list[ClientRecord] = []
        for cid, model, client_seed in zip(client_ids, models, seeds, strict=True):
            updated, fit_record = _fit(task, federation, cid, model, replace(fit, seed=int(client_seed)), round_number)
            trained.append(updated)
            fitted.append(fit_record)
        models = gossip_step(trained, W)
        distance = consensus_distance(models)
        evaluating = round_number % evaluate_every == 0 or round_number == rounds
        average = _average(models) if observers or (evaluating and central is not None and len(central)) else None
        evaluated: dict[str, Any] = {}
        tested: list[ClientRecord] = []
        if evaluating:
            evaluated, tested = _evaluate(task, federation, client_ids, models, average)
        losses = [r.loss for r in fitted if r.loss is not None]
        gossip_round = GossipRound(
            round=round_number,
            consensus_distance=distance,
            seconds=time.perf_counter() - start,
            fit_loss=math.fsum(losses) / len(losses) if len(losses) == len(models) else None,
            **evaluated,
        )
        history.append(gossip_round)
        if observers:
            assert average is not None  # computed for them
            fitted = [replace(r, bytes_down=size, bytes_up=size) for r, size in zip(fitted, exchanged, strict=True)]
            record = _round_record(gossip_round, gap, (*fitted, *tested))
            for observer in observers:
                observer.on_round(record, average)
        if progress is not None:
            progress(gossip_round)
    final = average if average is not None else _average(models)
    return GossipResult(dict(zip(client_ids, models, strict=True)), final, tuple(history), topology, gap)


def _round_record(gossip_round: GossipRound, gap: float, clients: tuple[ClientRecord, ...]) -> RoundRecord:
    """The round as the server loop reports one (see :data:`RECORDED_METRICS`)."""
    metrics = {
        name: float(value)
        for attribute, name in RECORDED_METRICS.items()
        if (value := getattr(gossip_round, attribute)) is not None
    }
    metrics["spectral_gap"] = gap
    return RoundRecord(gossip_round.round, metrics, clients, gossip_round.seconds)


def _fit(
    task: Task, federation: Federation, cid: str, model: Params, config: FitConfig, round_number: int
) -> tuple[Params, ClientRecord]:
    """Client ``cid``'s model after local training, and its ``fit`` record (its training loss where it reports
    one). A client with no training data keeps its model."""
    train = federation.clients[cid].train
    if not len(train):
        return model, ClientRecord(cid, "fit", ClientStatus.OK, detail="no training data: it kept its model")
    start = time.perf_counter()
    with user_code(f"client {cid} in fit"):
        result = task.fit(model, train, config)
    seconds = time.perf_counter() - start
    try:
        check_update(model, result.params)
    except InvalidUpdateError as exc:
        raise InvalidUpdateError(f"round {round_number}: client {cid}'s trained model: {exc}") from None
    loss = result.metrics.get("loss")
    record = ClientRecord(
        cid,
        "fit",
        ClientStatus.OK,
        num_examples=result.num_examples,
        loss=None if loss is None else float(loss),
        accuracy=result.metrics.get("accuracy"),
        seconds=seconds,
        metrics=dict(result.metrics),
    )
    return result.params, record


def _evaluate(
    task: Task, federation: Federation, client_ids: list[str], models: list[Params], average: Params | None
) -> tuple[dict[str, Any], list[ClientRecord]]:
    """The mean of each client's own model on its own test split, and ``average`` (the average model) on the
    central test; and an ``evaluate`` record per client with test data."""
    out: dict[str, Any] = {}
    records: list[ClientRecord] = []
    losses, accuracies = [], []
    for cid, model in zip(client_ids, models, strict=True):
        test = federation.clients[cid].test
        if not len(test):
            continue
        start = time.perf_counter()
        with user_code(f"client {cid} in evaluate"):
            result = task.evaluate(model, test)
        records.append(
            ClientRecord(
                cid,
                "evaluate",
                ClientStatus.OK,
                num_examples=result.num_examples,
                loss=result.loss,
                accuracy=result.metrics.get("accuracy"),
                seconds=time.perf_counter() - start,
                metrics=dict(result.metrics),
            )
        )
        losses.append(result.loss)
        if "accuracy" in result.metrics:
            accuracies.append(result.metrics["accuracy"])
    if losses:
        out["client_loss"] = math.fsum(losses) / len(losses)
    if accuracies and len(accuracies) == len(losses):
        out["client_accuracy"] = math.fsum(accuracies) / len(accuracies)
    central = federation.central_test
    if central is not None and len(central):
        assert average is not None  # computed wherever there is a central test to evaluate it on
        with user_code("central evaluation of the average model"):
            result = task.evaluate(average, central)
        out["central_loss"] = result.loss
        if "accuracy" in result.metrics:
            out["central_accuracy"] = result.metrics["accuracy"]
    return out, records


def _average(models: list[Params]) -> Params:
    """The unweighted mean of the clients' models, in the models' dtypes (what gossip converges to)."""
    return weighted_mean(models, [1.0] * len(models))
