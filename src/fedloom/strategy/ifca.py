"""IFCA, the Iterative Federated Clustering Algorithm of Ghosh et al. 2020, "An Efficient Framework for
Clustered Federated Learning": k global models, and each client trains the one that fits its data best."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedloom.core.config import FitConfig
from fedloom.core.errors import ConfigError, DecodeError, NotEnoughClientsError
from fedloom.core.message import Message
from fedloom.core.params import Params
from fedloom.core.results import EvalResult, FitResult
from fedloom.strategy.aggregate import RunningMean, cast_like, f64, fit_loss
from fedloom.strategy.local import Client, with_local
from fedloom.strategy.sampling import ClientSampling

__all__ = ["IFCA", "IFCAClient", "IFCAState"]

log = logging.getLogger("fedloom.server")

NAME = "ifca"
#: The metric in which a client says which cluster's model it chose.
CLUSTER = "cluster"


def _prefix(cluster: int) -> str:
    return f"ifca.{cluster}/"


@dataclass(frozen=True)
class IFCAState:
    """The k cluster models, how many clients chose each in the last round they were asked, and the round."""

    models: tuple[Params, ...]
    sizes: tuple[int, ...]
    server_round: int = 0


@dataclass(frozen=True)
class IFCA(ClientSampling):
    """IFCA with model averaging (Ghosh et al. 2020, Algorithm 1, option II): each round every sampled client
    gets all ``k`` cluster models, picks the one with the lowest loss on its training data, trains it locally
    as ``fit`` says and sends it back with the cluster it chose. Each cluster's model becomes the
    example-weighted mean of the models its clients sent; a cluster no client chose keeps its model.
    Federated evaluation lets each client pick its cluster the same way and reports that model's test
    numbers, so the per-client and mean accuracies are of the clustered models.

    The k models start from the initial model, each plus its own Gaussian noise of ``init_noise`` times the
    RMS of the model's values (``init_noise`` for a model of zeros), drawn from ``seed`` and the cluster (the paper
    starts from random models: identical ones would never separate, and one left at the initial model tends to
    win every client, being nobody's bad fit). Every
    instruction carries the k models: k times FedAvg's download, as in the paper.

    The strategy's global model (``params``, what is checkpointed and evaluated centrally) is the model of the
    cluster most clients chose in the last round.
    """

    k: int = 2
    init_noise: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"k must be a whole number >= 1, got {self.k!r}")
        if not self.init_noise >= 0:
            raise ConfigError(f"init_noise must be >= 0, got {self.init_noise}")
        if self.finetune is not None:
            raise ConfigError("IFCA evaluates each client's chosen cluster model; finetune= does not apply")

    def init(self, params: Params) -> IFCAState:
        if self.k == 1:  # FedAvg
            return IFCAState((params,), (0,))
        floating = [f64(a) for a in params.values() if np.issubdtype(a.dtype, np.floating)]
        size = sum(a.size for a in floating)
        rms = float(np.sqrt(sum(float(np.vdot(a, a)) for a in floating) / size)) if size else 0.0
        std = self.init_noise * (rms if rms > 0 else 1.0)
        models = []
        for j in range(self.k):
            rng = np.random.default_rng([self.seed, j])
            models.append(cast_like(params, {n: _perturbed(a, std, rng) for n, a in params.items()}))
        return IFCAState(tuple(models), (0,) * self.k)

    def params(self, state: IFCAState) -> Params:
        return state.models[int(np.argmax(state.sizes))]

    def _payload(self, state: IFCAState) -> Params:
        return Params({_prefix(j) + n: a for j, m in enumerate(state.models) for n, a in m.items()}, copy=False)

    def configure_fit(
        self, server_round: int, state: IFCAState, clients: Sequence[str], rng: np.random.Generator
    ) -> dict[str, Message]:
        plain = self.fit_instructions(server_round, self._payload(state), clients, rng)
        return {cid: with_local(message, NAME, k=self.k) for cid, message in plain.items()}

    def fit_reply_layout(self, instruction: Message) -> Params:
        first = _prefix(0)
        return Params({n[len(first) :]: a for n, a in instruction.params.items() if n.startswith(first)}, copy=False)

    def aggregate_fit(
        self, server_round: int, state: IFCAState, results: Mapping[str, FitResult]
    ) -> tuple[IFCAState, dict[str, float]]:
        means = [RunningMean() for _ in range(self.k)]
        for client_id, result in results.items():
            cluster = result.metrics.get(CLUSTER)
            if cluster is None or cluster != int(cluster) or not 0 <= cluster < self.k:
                log.warning(
                    "round %d: IFCA leaves out client %s, which named no valid cluster", server_round, client_id
                )
                continue
            means[int(cluster)].add(result.params, result.num_examples)
        if not any(m.count for m in means):
            raise NotEnoughClientsError(f"round {server_round}: no client returned a usable IFCA update")
        models = []
        for model, mean in zip(state.models, means, strict=True):
            try:
                models.append(mean.result() if mean.count else model)
            except ConfigError:  # the clients that chose this cluster have no examples
                models.append(model)
        sizes = tuple(m.count for m in means)
        metrics = {**fit_loss(results.values()), **{f"ifca_cluster_{j}_clients": float(n) for j, n in enumerate(sizes)}}
        return IFCAState(tuple(models), sizes, server_round), metrics

    def configure_evaluate(
        self, server_round: int, state: IFCAState, clients: Sequence[str], rng: np.random.Generator
    ) -> dict[str, Message]:
        plain = super().configure_evaluate(server_round, state, clients, rng)
        payload = self._payload(state)
        return {cid: with_local(Message(m.kind, payload, m.metadata), NAME, k=self.k) for cid, m in plain.items()}

    def aggregate_evaluate(
        self, server_round: int, state: IFCAState, results: Mapping[str, EvalResult]
    ) -> dict[str, float]:
        plain = {
            cid: EvalResult(r.loss, r.num_examples, {n: v for n, v in r.metrics.items() if n != CLUSTER})
            for cid, r in results.items()
        }
        return super().aggregate_evaluate(server_round, state, plain)


def _perturbed(array: np.ndarray[Any, Any], std: float, rng: np.random.Generator) -> np.ndarray[Any, Any]:
    """``array`` plus Gaussian noise of ``std`` (in float64), or as it is for an integer array."""
    if not np.issubdtype(array.dtype, np.floating):
        return array
    noisy: np.ndarray[Any, Any] = f64(array) + rng.normal(0.0, std, size=array.shape)
    return noisy


class IFCAClient:
    """IFCA's client half: choose the cluster model with the lowest training loss, then train or evaluate it."""

    def _choose(self, client: Client, params: Params, args: Mapping[str, Any]) -> tuple[int, Params]:
        k = args.get("k")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise DecodeError(f"an IFCA instruction's k must be a whole number >= 1, got {k!r}")
        models = []
        for j in range(k):
            prefix = _prefix(j)
            model = {n[len(prefix) :]: a for n, a in params.items() if n.startswith(prefix)}
            if not model:
                raise DecodeError(f"an IFCA instruction names {k} clusters but sends no model for cluster {j}")
            models.append(Params(model, copy=False))
        if len(models) == 1 or len(client.data.train) == 0:
            return 0, models[0]
        losses = [client.task.evaluate(m, client.data.train).loss for m in models]
        best = int(np.argmin(losses))
        return best, models[best]

    def fit(self, client: Client, params: Params, config: FitConfig, args: Mapping[str, Any]) -> FitResult:
        cluster, model = self._choose(client, params, args)
        result = client.task.fit(model, client.data.train, config)
        return FitResult(result.params, result.num_examples, {**result.metrics, CLUSTER: float(cluster)})

    def evaluate(self, client: Client, params: Params, args: Mapping[str, Any]) -> EvalResult:
        cluster, model = self._choose(client, params, args)
        result = client.task.evaluate(model, client.data.test)
        return EvalResult(result.loss, result.num_examples, {**result.metrics, CLUSTER: float(cluster)})
