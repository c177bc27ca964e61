"""q-FFL, as q-FedAvg (Algorithm 2) of Li, Sanjabi, Beirami and Smith 2020, "Fair Resource Allocation in
Federated Learning": clients with a higher loss weigh more, so accuracy is spread more evenly over them."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedloom.core.config import FitConfig
from fedloom.core.errors import ConfigError, NotEnoughClientsError
from fedloom.core.message import Message
from fedloom.core.params import Params
from fedloom.core.results import FitResult
from fedloom.strategy.aggregate import cast_like, f64, fit_loss
from fedloom.strategy.fedavg import FedAvgState
from fedloom.strategy.local import Client, FitOnly, with_local
from fedloom.strategy.sampling import ClientSampling

__all__ = ["QFedAvg", "QFedAvgClient"]

log = logging.getLogger("fedloom.strategy")

NAME = "qffl"
#: The metric in which a client reports its training loss at the global model, before it trains.
LOSS = "qffl.loss"
_EPSILON = 1e-10  # keeps F^(q-1) finite for a client whose loss is 0


@dataclass(frozen=True)
class QFedAvg(ClientSampling):
    """q-FedAvg, which minimizes ``sum_k p_k F_k(w)^(q+1) / (q+1)``: ``q = 0`` is FedAvg's objective, larger
    ``q`` favours the clients the model serves worst.

    Each client reports ``F_k``, its loss on its training data at the global model ``w``, then trains as
    FedAvg's clients do to ``w_k``. With ``L = 1 / fit.lr`` (the paper's Lipschitz estimate),
    ``dw_k = L (w - w_k)``, ``D_k = F_k^q dw_k`` and ``h_k = q F_k^(q-1) ||dw_k||^2 + L F_k^q``; the server
    sets ``w <- w - sum_k D_k / sum_k h_k``. A reply without ``F_k`` is left out, with a warning.
    """

    q: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.q >= 0:
            raise ConfigError(f"q must be >= 0, got {self.q}")

    def init(self, params: Params) -> FedAvgState:
        return FedAvgState(params)

    def configure_fit(
        self, server_round: int, state: FedAvgState, clients: Sequence[str], rng: np.random.Generator
    ) -> dict[str, Message]:
        plain = self.fit_instructions(server_round, state.params, clients, rng)
        return {cid: with_local(message, NAME) for cid, message in plain.items()}

    def aggregate_fit(
        self, server_round: int, state: FedAvgState, results: Mapping[str, FitResult]
    ) -> tuple[FedAvgState, dict[str, float]]:
        w = state.params
        lipschitz = 1.0 / self.fit.lr
        total = {n: np.zeros(a.shape, np.float64) for n, a in w.items()}
        h_total = 0.0
        used = 0
        for client_id, result in results.items():
            loss = result.metrics.get(LOSS)
            if loss is None or not np.isfinite(loss) or loss < 0:
                log.warning(
                    "round %d: q-FFL leaves out client %s, which sent no valid %s", server_round, client_id, LOSS
                )
                continue
            f = loss + _EPSILON
            dw = {n: lipschitz * (f64(w[n]) - f64(result.params[n])) for n in w}
            squared = float(sum(np.vdot(d, d) for d in dw.values()))
            for n in w:
                total[n] += f**self.q * dw[n]
            h_total += self.q * f ** (self.q - 1) * squared + lipschitz * f**self.q
            used += 1
        if not used or h_total <= 0:
            raise NotEnoughClientsError(f"round {server_round}: no client returned a usable q-FFL update")
        new = cast_like(w, {n: f64(w[n]) - total[n] / h_total for n in w})
        return FedAvgState(new, server_round), fit_loss(results.values())


class QFedAvgClient(FitOnly):
    """q-FFL's client half: its training loss at the global model, then FedAvg's local training."""

    def fit(self, client: Client, params: Params, config: FitConfig, args: Mapping[str, Any]) -> FitResult:
        before = client.task.evaluate(params, client.data.train)
        result = client.task.fit(params, client.data.train, config)
        return FitResult(result.params, result.num_examples, {**result.metrics, LOSS: before.loss})
