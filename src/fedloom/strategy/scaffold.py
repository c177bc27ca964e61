"""SCAFFOLD, Algorithm 1 of Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning": control variates that correct each client's drift from the global descent direction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedloom.core.config import FitConfig
from fedloom.core.errors import ConfigError, DecodeError, NotEnoughClientsError
from fedloom.core.message import Message
from fedloom.core.params import Params
from fedloom.core.results import FitResult
from fedloom.strategy.aggregate import RunningMean, cast_like, f64, fit_loss
from fedloom.strategy.local import Client, FitOnly, load_matching, with_local
from fedloom.strategy.sampling import ClientSampling

__all__ = ["Scaffold", "ScaffoldClient", "ScaffoldState"]

NAME = "scaffold"
#: Prefix of the control variates' names in SCAFFOLD's messages: ``scaffold.c/<param name>``.
PREFIX = "scaffold.c/"
_STATE_KEY = "scaffold.control"


@dataclass(frozen=True)
class ScaffoldState:
    """The global model ``x``, the server control variate ``c`` (float64, one per floating-point parameter)
    and the round."""

    params: Params
    control: Params
    server_round: int = 0


@dataclass(frozen=True)
class Scaffold(ClientSampling):
    """SCAFFOLD with control variates option II (they come from the local updates, at no extra cost).

    Each sampled client gets ``x`` and ``c`` and trains with every gradient corrected by ``c - c_i``, where
    ``c_i`` is its own control variate, kept on the client between rounds (zeros at first). It then sets
    ``c_i+ = c_i - c + (x - y_i) / (K lr)`` (``K`` local steps at learning rate ``lr``), keeps it, and sends
    ``y_i`` and ``c_i+ - c_i``. The server moves ``x`` by ``server_lr`` times the mean of ``y_i - x`` and
    ``c`` by ``|S| / N`` times the mean of the ``c_i`` changes.

    Choices the paper leaves open: the model update is weighted by example counts, as FedAvg's is, so the two
    differ only in the drift correction (the paper averages uniformly over equal-sized clients); ``|S| / N``
    is ``fraction``, the share of clients sampled, and with ``clients_per_round`` the number of clients is not
    known to the strategy, so ``population`` must then give it. Integer parameters (batch-norm counters) get no
    control variate and are averaged as FedAvg does.
    """

    server_lr: float = 1.0
    population: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.server_lr > 0:
            raise ConfigError(f"server_lr must be > 0, got {self.server_lr}")
        if self.population is not None and self.population < 1:
            raise ConfigError(f"population must be >= 1, got {self.population}")
        if self.clients_per_round is not None and self.population is None:
            raise ConfigError("SCAFFOLD with clients_per_round needs population= (how many clients there are)")

    def init(self, params: Params) -> ScaffoldState:
        control = {n: np.zeros(a.shape, np.float64) for n, a in params.items() if _floating(a)}
        return ScaffoldState(params, Params(control, copy=False))

    def configure_fit(
        self, server_round: int, state: ScaffoldState, clients: Sequence[str], rng: np.random.Generator
    ) -> dict[str, Message]:
        controls = {PREFIX + n: c.astype(state.params[n].dtype) for n, c in state.control.items()}
        payload = Params({**state.params, **controls}, copy=False)
        plain = self.fit_instructions(server_round, payload, clients, rng)
        return {cid: with_local(message, NAME) for cid, message in plain.items()}

    def aggregate_fit(
        self, server_round: int, state: ScaffoldState, results: Mapping[str, FitResult]
    ) -> tuple[ScaffoldState, dict[str, float]]:
        if not results:
            raise NotEnoughClientsError(f"round {server_round}: no client returned an update")
        model, control = RunningMean(), RunningMean()
        for result in results.values():
            model.add(Params({n: result.params[n] for n in state.params}, copy=False), result.num_examples)
            control.add(Params({n: result.params[PREFIX + n] for n in state.control}, copy=False), 1.0)
        try:
            mean = model.result(np.float64)
        except ConfigError:
            raise NotEnoughClientsError(f"round {server_round}: the clients that replied have no examples") from None
        x = state.params
        moved = {n: f64(x[n]) + self.server_lr * (f64(mean[n]) - f64(x[n])) if _floating(x[n]) else mean[n] for n in x}
        share = len(results) / self.population if self.population is not None else self.fraction
        changes = control.result(np.float64)
        new_control = {n: f64(c) + share * f64(changes[n]) for n, c in state.control.items()}
        new = ScaffoldState(cast_like(x, moved), Params(new_control, copy=False), server_round)
        return new, fit_loss(results.values())


class ScaffoldClient(FitOnly):
    """SCAFFOLD's client half: train with the corrected gradient, update and keep ``c_i``, send the change."""

    def fit(self, client: Client, params: Params, config: FitConfig, args: Mapping[str, Any]) -> FitResult:
        x = Params({n: a for n, a in params.items() if not n.startswith(PREFIX)}, copy=False)
        c = {n[len(PREFIX) :]: f64(a) for n, a in params.items() if n.startswith(PREFIX)}
        if any(n not in x for n in c):
            raise DecodeError("a SCAFFOLD instruction has a control variate for a parameter it does not send")
        saved = load_matching(client.state, _STATE_KEY, c)  # None at first, or for another model: start over
        c_i = {n: f64(saved[n]) if saved is not None else np.zeros_like(a) for n, a in c.items()}
        correction = Params({n: c[n] - c_i[n] for n in c}, copy=False)
        result = client.task.fit(x, client.data.train, config, correction=correction)
        steps = result.metrics.get("steps")
        if not steps:
            raise ConfigError("SCAFFOLD needs the task to report how many local steps it took (metrics 'steps')")
        y = result.params
        c_new = {n: c_i[n] - c[n] + (f64(x[n]) - f64(y[n])) / (steps * config.lr) for n in c}
        client.state.save(_STATE_KEY, Params(c_new, copy=False))
        changes = {PREFIX + n: (c_new[n] - c_i[n]).astype(x[n].dtype) for n in c}
        return FitResult(Params({**y, **changes}, copy=False), result.num_examples, result.metrics)


def _floating(array: np.ndarray[Any, Any]) -> bool:
    return bool(np.issubdtype(array.dtype, np.floating))
