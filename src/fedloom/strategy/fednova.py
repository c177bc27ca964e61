"""FedNova, Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization": normalized averaging, so that clients that take more local steps do not pull the model toward
their own objective."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from fedloom.core.errors import NotEnoughClientsError
from fedloom.core.params import Params
from fedloom.core.results import FitResult
from fedloom.strategy.aggregate import RunningMean, cast_like, f64, fit_loss, weighted_mean_scalar
from fedloom.strategy.fedavg import FedAvgState
from fedloom.strategy.sampling import ClientSampling

__all__ = ["FedNova"]

log = logging.getLogger("fedloom.strategy")


@dataclass(frozen=True)
class FedNova(ClientSampling):
    """FedNova with local SGD (no momentum), where a client's normalizing vector sums to its step count
    ``tau_i``: the server averages the normalized updates ``(y_i - x) / tau_i`` with weights ``p_i = n_i / n``
    and scales the result by the effective step count ``tau_eff = sum_i p_i tau_i``:
    ``x <- x + tau_eff * sum_i p_i (y_i - x) / tau_i``. With equal step counts this is FedAvg. Clients report
    ``tau_i`` as the ``steps`` metric (every built-in task does); a reply without it is left out, with a
    warning. Unequal local work comes from ``local_epochs`` over unequal datasets, or ``work_range``.
    """

    def init(self, params: Params) -> FedAvgState:
        return FedAvgState(params)

    def aggregate_fit(
        self, server_round: int, state: FedAvgState, results: Mapping[str, FitResult]
    ) -> tuple[FedAvgState, dict[str, float]]:
        x = state.params
        normalized = RunningMean()
        steps, weights = [], []
        for client_id, result in results.items():
            tau = result.metrics.get("steps", 0.0)
            if not tau > 0 or result.num_examples == 0:
                log.warning("round %d: FedNova leaves out client %s, which reported no steps", server_round, client_id)
                continue
            update = {n: (f64(result.params[n]) - f64(x[n])) / tau for n in x}
            normalized.add(Params(update, copy=False), result.num_examples)
            steps.append(tau)
            weights.append(result.num_examples)
        if not steps:
            raise NotEnoughClientsError(f"round {server_round}: no client returned an update with local steps")
        tau_eff = weighted_mean_scalar(steps, weights)
        direction = normalized.result()
        new = cast_like(x, {n: f64(x[n]) + tau_eff * f64(direction[n]) for n in x})
        metrics = fit_loss(results.values())
        metrics["tau_eff"] = tau_eff
        return FedAvgState(new, server_round), metrics
