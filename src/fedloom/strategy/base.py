"""The ``Strategy`` contract: explicit state in, state out."""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar, runtime_checkable

import numpy as np

from fedloom.core.config import FitConfig
from fedloom.core.message import Message
from fedloom.core.params import Params
from fedloom.core.results import EvalResult, FitResult

__all__ = [
    "AsyncStrategy",
    "FitFold",
    "FitProtocol",
    "FoldingStrategy",
    "ProtocolResult",
    "ProtocolStrategy",
    "ReshapingStrategy",
    "ScreenedStrategy",
    "Strategy",
    "SummableStrategy",
    "UpdateBuffer",
]

S = TypeVar("S")
S_co = TypeVar("S_co", covariant=True)


class Strategy(Protocol[S]):
    """A federated algorithm as pure steps over an explicit state ``S``; nothing is kept on ``self``.

    - ``init(params)``: the state before round 1.
    - ``params(state)``: the global model held in ``state``.
    - ``configure_fit(round, state, clients, rng)``: which clients train this round, and what each is sent.
    - ``aggregate_fit(round, state, results)``: the new state from the replies that arrived, and metrics.
    - ``configure_evaluate`` / ``aggregate_evaluate``: the same for federated evaluation.
    - ``min_clients``: the fewest replies a round may aggregate; the server loop enforces it.

    ``rng`` is the server's seeded generator: all randomness of a strategy comes from it.
    """

    @property
    def min_clients(self) -> int: ...

    def init(self, params: Params) -> S: ...

    def params(self, state: S) -> Params: ...

    def configure_fit(
        self, server_round: int, state: S, clients: Sequence[str], rng: np.random.Generator
    ) -> dict[str, Message]: ...

    def aggregate_fit(
        self, server_round: int, state: S, results: Mapping[str, FitResult]
    ) -> tuple[S, dict[str, float]]: ...

    def configure_evaluate(
        self, server_round: int, state: S, clients: Sequence[str], rng: np.random.Generator
    ) -> dict[str, Message]: ...

    def aggregate_evaluate(
        self, server_round: int, state: S, results: Mapping[str, EvalResult]
    ) -> dict[str, float]: ...


@runtime_checkable
class SummableStrategy(Strategy[S], Protocol[S]):
    """A strategy whose round's aggregate is a weighted sum: the example-weighted mean of its clients' updates
    ``w_k - w`` (each first scaled to at most ``clip_norm``, where that is set), made a step by its server
    optimizer. A privacy wrapper that learns only a sum of the updates (secure aggregation, Paillier) or adds
    noise to it (DP-FedAvg) stands in for the aggregation of any strategy with this capability (FedAvg, FedProx,
    FedAvgM, FedAdagrad/FedAdam/FedYogi), and asks for nothing else of it.

    - ``summable()``: ``None`` where this configuration's aggregate is such a sum, else why not (a robust
      aggregator needs each update; an asynchronous buffer, personal layers, a local algorithm...).
    - ``apply_update(round, state, delta)``: the state after a round whose mean update is ``delta`` (float64).
    - ``server_init(params)`` and ``server_step(params, delta, optimizer_state) -> (params, optimizer_state)``:
      the server optimizer alone, for a wrapper that keeps the model in a state of its own (DP-FedAvg).
    - ``fraction`` and ``fit_configs(n, rng)``: the share of clients a round samples and the fit settings of
      ``n`` chosen clients, for a wrapper that samples the clients itself (DP-FedAvg's Poisson sampling).
    """

    @property
    def clip_norm(self) -> float | None: ...

    @property
    def fraction(self) -> float: ...

    def summable(self) -> str | None: ...

    def apply_update(self, server_round: int, state: S, delta: Params) -> S: ...

    def server_init(self, params: Params) -> Params: ...

    def server_step(self, params: Params, delta: Params, optimizer_state: Params) -> tuple[Params, Params]: ...

    def fit_configs(self, count: int, rng: np.random.Generator) -> list[FitConfig]: ...


class FitFold(Protocol[S_co]):
    """One round's aggregation, fed one update at a time: :meth:`add` as each valid update arrives (in any
    order), then :meth:`finish` once for the new state and the round's metrics."""

    def add(self, client_id: str, result: FitResult) -> None: ...

    def finish(self) -> tuple[S_co, dict[str, float]]: ...


@runtime_checkable
class FoldingStrategy(Strategy[S], Protocol[S]):
    """A strategy that can aggregate while the replies arrive. The server loop then folds each update in as
    it comes and drops its arrays, so the server holds one aggregate rather than every client's update.
    ``fold_fit(round, state)`` must give the same result as ``aggregate_fit`` over the same updates added in
    the same order, or be ``None`` where this configuration cannot fold (a robust rule needs every update at
    once): the loop then gathers the updates and calls ``aggregate_fit``."""

    def fold_fit(self, server_round: int, state: S) -> FitFold[S] | None: ...


@runtime_checkable
class ReshapingStrategy(Strategy[S], Protocol[S]):
    """A strategy whose clients reply with other params than they were sent: FedPer's clients keep their
    personal layers and send only the shared ones back; IFCA sends k models and gets one back.

    ``fit_reply_layout(instruction)`` is what a valid reply to the fit ``instruction`` carries: its names,
    shapes and dtypes (the values are not used). The server loop checks each reply against it, as it checks
    other strategies' replies against the params their clients were sent."""

    def fit_reply_layout(self, instruction: Message) -> Params: ...


@runtime_checkable
class ScreenedStrategy(Protocol):
    """A strategy whose round updates the server loop screens (:mod:`fedloom.runtime.screening`): an update whose
    norm of change is over ``update_guard`` times the round's median is refused, and no site weighs more than
    ``max_share`` of a round (``None``: that check is off). :class:`~fedloom.strategy.sampling.ClientSampling`
    has both, so every synchronous strategy built on it does."""

    @property
    def update_guard(self) -> float | None: ...

    @property
    def max_share(self) -> float | None: ...


class UpdateBuffer(Protocol[S_co]):
    """An asynchronous server's buffer of updates: :meth:`add` each valid update as it arrives, with the params
    its client trained from (``base``) and its ``staleness`` (how many server updates happened since that
    client was sent ``base``); :meth:`finish` once the buffer is full, for the new state and its metrics."""

    @property
    def count(self) -> int: ...

    def add(self, client_id: str, result: FitResult, base: Params, staleness: int) -> None: ...

    def finish(self) -> tuple[S_co, dict[str, float]]: ...


@runtime_checkable
class AsyncStrategy(Strategy[S], Protocol[S]):
    """A strategy for asynchronous rounds (FedBuff): the server keeps ``concurrency`` clients training at all
    times, each on the newest model when it starts, and updates the model every ``buffer_size`` replies,
    whatever models those clients started from. :func:`fedloom.runtime.asynchronous.run_async` drives it;
    each server update is one round of the run's history.

    - ``instruct(version, state, client_id, rng)``: what a client starting now is sent (``version`` is the
      number of server updates so far; the instruction's round is ``version + 1``).
    - ``buffer(server_round, state)``: an empty :class:`UpdateBuffer` for the update that makes ``server_round``.
    - ``max_staleness``: updates staler than this are refused (``None``: none are).
    """

    @property
    def concurrency(self) -> int: ...

    @property
    def buffer_size(self) -> int: ...

    @property
    def max_staleness(self) -> int | None: ...

    def instruct(self, version: int, state: S, client_id: str, rng: np.random.Generator) -> Message: ...

    def buffer(self, server_round: int, state: S) -> UpdateBuffer[S]: ...


@dataclass(frozen=True)
class ProtocolResult(Generic[S]):
    """How a fit protocol ended: the new state, the round's metrics, and for each client whose contribution is
    in the aggregate, the SHA-256 of what it sent (for the privacy ledger: with secure aggregation, its masked
    input; the server never sees the update itself)."""

    state: S
    metrics: dict[str, float]
    used: Mapping[str, str] = field(default_factory=dict)


#: A fit protocol as a generator: it yields each step's messages (client id -> message), is sent the replies
#: that arrived (client id -> message; a client that dropped is absent), and returns the round's result.
FitProtocol = Generator[dict[str, Message], dict[str, Message], ProtocolResult[S]]


@runtime_checkable
class ProtocolStrategy(Strategy[S], Protocol[S]):
    """A strategy whose fit phase is a protocol of several exchanges rather than one (secure aggregation:
    :class:`fedloom.privacy.SecAgg`). The server loop asks ``configure_fit`` for the round's instructions as
    usual, then runs ``fit_protocol(round, state, instructions)`` over its grid, step by step, instead of
    sending the instructions and aggregating the replies; the protocol makes no network call of its own. A
    protocol that cannot finish a round raises :class:`~fedloom.core.errors.RoundFailedError`: the loop records
    the round as failed and goes on, until ``max_failed_rounds`` rounds in a row have failed."""

    @property
    def max_failed_rounds(self) -> int: ...

    def fit_protocol(self, server_round: int, state: S, instructions: Mapping[str, Message]) -> FitProtocol[S]: ...
