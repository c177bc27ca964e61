"""What the aggregation protocols (secure aggregation, Paillier) share: how a client turns its fit into one flat
vector to protect, and how the server turns the protected sum back into the new global model.

An ``encoding`` (JSON, sent with the round) says how:

- ``mode``: ``"mean"`` (FedAvg's example-weighted mean) or ``"dp"`` (DP-FedAvg's noised sum, noise added by
  each client);
- ``range``, ``clients``: the quantizer (values clipped to ``[-range, range]``, sums of up to ``clients``);
- ``clip_norm``: an L2 bound on the whole update, applied by the client (``None``: none);
- ``weight_cap`` (mean): a client's weight is ``min(n_k, weight_cap) / weight_cap``;
- ``noise`` (dp): the standard deviation of each client's share of the Gaussian noise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from fedloom.core.errors import ConfigError, DecodeError, InvalidUpdateError, NotEnoughClientsError
from fedloom.core.message import Message, MessageKind
from fedloom.core.params import Params
from fedloom.core.results import EvalResult, FitResult
from fedloom.core.validation import check_update
from fedloom.privacy.quantize import Quantizer
from fedloom.strategy.base import SummableStrategy
from fedloom.strategy.local import local_args
from fedloom.strategy.robust import clip_to_norm

__all__ = [
    "CLIENT_NOISE_KEY",
    "check_whole",
    "Layout",
    "ProtocolWrapper",
    "check_summable",
    "fit_vector",
    "layout_of",
    "mean_release",
    "quantizer_of",
    "summable",
    "unflatten",
]

Layout = dict[str, tuple[int, ...]]
S = TypeVar("S")

#: Where a fit instruction carries distributed DP's clip and noise for the client's ClientNoise mod, and where
#: its reply says they were applied.
CLIENT_NOISE_KEY = "client_noise"


def check_summable(inner: Any, *, wrapper: str, value_range: float | None, weight_cap: int) -> None:
    """Raise :class:`ConfigError` unless ``wrapper`` (SecAgg, PaillierAgg) can protect ``inner``'s updates: a
    :class:`~fedloom.strategy.base.SummableStrategy` whose configuration's aggregate is a weighted sum (its
    ``summable()`` says so), and an encoding with ``value_range > 0`` (or ``None``, the default) and a whole
    ``weight_cap >= 1``."""
    summable(inner, wrapper)
    if value_range is not None and not value_range > 0:
        raise ConfigError(f"value_range must be > 0, got {value_range}")
    check_whole("weight_cap", weight_cap)


def check_whole(name: str, value: Any) -> None:
    """Refuse a setting ``name`` (``weight_cap``, ``max_failed_rounds``) that is not a whole number >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")


def summable(inner: Any, wrapper: str) -> SummableStrategy[Any]:
    """``inner`` if ``wrapper`` can stand in for its aggregation with a sum of its clients' updates (it has the
    :class:`~fedloom.strategy.base.SummableStrategy` capability and this configuration of it is summable), else
    :class:`ConfigError` saying why."""
    if not isinstance(inner, SummableStrategy):
        raise ConfigError(
            f"{wrapper} wraps a strategy whose aggregate is a weighted sum of its clients' updates (FedAvg, "
            f"FedProx, FedAvgM, FedAdagrad, FedAdam, FedYogi); {type(inner).__name__} is not one"
        )
    reason = inner.summable()
    if reason is not None:
        raise ConfigError(f"{wrapper} cannot wrap {type(inner).__name__}: {reason}")
    return inner


def layout_of(instructions: Mapping[str, Message]) -> Layout:
    """The names and shapes of the model every client of the round was sent (the same for all, or
    :class:`ConfigError`): what the protected sum is the sum of."""
    layouts = {tuple((n, a.shape) for n, a in m.params.items()) for m in instructions.values()}
    if len(layouts) != 1:
        raise ConfigError("a protected sum is of one model: every client of a round must be sent the same layout")
    return dict(layouts.pop())


def vector_length(layout: Layout, encoding: Mapping[str, Any]) -> int:
    """How many values a client protects: the model's, plus its weight for a mean."""
    return sum(int(np.prod(shape)) for shape in layout.values()) + int(encoding["mode"] == "mean")


def unflatten(flat: npt.NDArray[np.float64], layout: Layout) -> Params:
    arrays, start = {}, 0
    for name, shape in layout.items():
        size = int(np.prod(shape))
        arrays[name] = flat[start : start + size].reshape(shape)
        start += size
    return Params(arrays, copy=False)


def quantizer_of(encoding: Mapping[str, Any]) -> Quantizer:
    return Quantizer(clip=float(encoding["range"]), clients=int(encoding["clients"]))


def mean_encoding(strategy: SummableStrategy[Any], value_range: float, cohort: int, weight_cap: int) -> dict[str, Any]:
    """The encoding of FedAvg's mean for a cohort of ``cohort``."""
    return {
        "mode": "mean",
        "range": value_range,
        "clients": cohort,
        "clip_norm": strategy.clip_norm,
        "weight_cap": weight_cap,
    }


def fit_vector(
    params: Params, instruction: Mapping[str, Any], encoding: Mapping[str, Any], train: Callable[[Message], Message]
) -> npt.NDArray[np.float64]:
    """A client's side: train on the fit instruction (``params`` and its ``instruction`` metadata) through
    ``train`` and return the flat float64 vector to protect, as ``encoding`` says (the module docstring). In the
    ``dp`` mode the fit instruction carries the clip and noise under :data:`CLIENT_NOISE_KEY`, for the client's
    :class:`~fedloom.privacy.ClientNoise` mod, and an update that comes back without it is refused. Raises
    :class:`DecodeError` for an instruction that names a local algorithm, or an update that does not fit the
    model it was sent or was not noised."""
    dp = encoding["mode"] == "dp"
    if dp:
        noise = {"clip_norm": float(encoding["clip_norm"]), "noise": float(encoding["noise"])}
        instruction = {**instruction, CLIENT_NOISE_KEY: noise}
    fit = Message(MessageKind.FIT, params, instruction)
    if local_args(fit) is not None:
        raise DecodeError("a protected sum carries a plain fit; this one names a local algorithm")
    reply = train(fit)
    if dp and reply.metadata.get(CLIENT_NOISE_KEY) != "applied":
        raise DecodeError(
            "distributed DP needs the client to clip and noise its update, and this client's chain has no "
            "ClientNoise mod (fedloom.privacy.protocol_mods)"
        )
    result = FitResult.from_message(reply)
    try:
        check_update(params, result.params)
    except InvalidUpdateError as exc:
        raise DecodeError(f"the task's update does not fit the model it was sent: {exc}") from None
    update = Params({n: np.asarray(result.params[n], np.float64) - np.asarray(params[n], np.float64) for n in params})
    clip = encoding.get("clip_norm")
    if clip is not None and not dp:  # under DP the client's ClientNoise mod clipped it, before the noise
        update = clip_to_norm(update, float(clip))
    flat = np.concatenate([update[n].reshape(-1) for n in update]) if len(update) else np.zeros(0)
    if dp:
        return flat
    value_range = float(encoding["range"])
    flat = np.clip(flat, -value_range, value_range)  # each coordinate within the range, before weighting
    cap = int(encoding["weight_cap"])
    weight = min(result.num_examples, cap) / cap
    return np.concatenate([flat * weight, [weight]])


def mean_release(
    strategy: SummableStrategy[S], server_round: int, state: S, total: npt.NDArray[np.float64], layout: Layout
) -> tuple[S, float]:
    """The server's side, for a mean: the state after the round from the sum of the clients' vectors (their
    weighted updates, then their summed weight), and that summed weight."""
    weight = float(total[-1])
    if not weight > 0:
        raise NotEnoughClientsError(f"round {server_round}: the clients summed have no training examples")
    return strategy.apply_update(server_round, state, unflatten(total[:-1] / weight, layout)), weight


class ProtocolWrapper:
    """The :class:`~fedloom.strategy.base.Strategy` contract of a wrapper whose round's training is a protocol
    (:class:`~fedloom.privacy.SecAgg`, :class:`~fedloom.privacy.PaillierAgg`): everything but the fit's
    aggregation is the wrapped ``strategy``'s, and a round needs at least two clients (a sum of one is the
    update)."""

    strategy: Any

    @property
    def min_clients(self) -> int:
        return max(2, int(self.strategy.min_clients))

    def init(self, params: Params) -> Any:
        return self.strategy.init(params)

    def params(self, state: Any) -> Params:
        params: Params = self.strategy.params(state)
        return params

    def configure_fit(
        self, server_round: int, state: Any, clients: Sequence[str], rng: np.random.Generator
    ) -> dict[str, Message]:
        instructions: dict[str, Message] = self.strategy.configure_fit(server_round, state, clients, rng)
        return instructions

    def aggregate_fit(
        self, server_round: int, state: Any, results: Mapping[str, FitResult]
    ) -> tuple[Any, dict[str, float]]:
        name = type(self).__name__
        raise ConfigError(f"{name}'s training is a protocol (fit_protocol): run it with fedloom.runtime.run_rounds")

    def configure_evaluate(
        self, server_round: int, state: Any, clients: Sequence[str], rng: np.random.Generator
    ) -> dict[str, Message]:
        instructions: dict[str, Message] = self.strategy.configure_evaluate(server_round, state, clients, rng)
        return instructions

    def aggregate_evaluate(self, server_round: int, state: Any, results: Mapping[str, EvalResult]) -> dict[str, float]:
        metrics: dict[str, float] = self.strategy.aggregate_evaluate(server_round, state, results)
        return metrics
