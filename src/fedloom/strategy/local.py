"""The client half of federated algorithms: what a client runs for an instruction, beyond plain training.

A strategy that needs more of a client than ``task.fit`` and ``task.evaluate`` (SCAFFOLD's control variates,
personal layers, Ditto's personal model, q-FFL's loss at the global model) names a *local algorithm* in its
instructions: ``metadata["local"] = {"name": NAME, **args}`` (:func:`with_local`). Every client runtime (the
simulation backends and the deployed client) looks the name up in the built-in catalog and runs it with a
:class:`Client`: the task, the client's data, and the client's own persistent :class:`ClientState`. No code
travels with a message: a client runs only algorithms it has, and refuses a name it does not know.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedloom.core.config import FitConfig
from fedloom.core.errors import ConfigError, DecodeError
from fedloom.core.message import Message
from fedloom.core.params import Params
from fedloom.core.results import EvalResult, FitResult
from fedloom.data.base import ClientData
from fedloom.task.base import Task

__all__ = [
    "FINETUNE",
    "Client",
    "ClientState",
    "FineTune",
    "FitOnly",
    "LocalAlgorithm",
    "load_matching",
    "local_args",
    "with_local",
]


class ClientState(Protocol):
    """What one client keeps between rounds (control variates, personal layers, a personal model): named
    ``Params`` that survive across rounds, and for a deployed client across reconnects and restarts (they are
    files on the client's own disk). Nothing in it is sent unless the algorithm sends it.

    ``load(key)`` is ``None`` when nothing was saved under ``key``; ``save`` replaces atomically."""

    def load(self, key: str) -> Params | None: ...

    def save(self, key: str, params: Params) -> None: ...


@dataclass(frozen=True)
class Client:
    """A client as a local algorithm sees it: its task, its data and its persistent state."""

    task: Task
    data: ClientData
    state: ClientState


def load_matching(state: ClientState, key: str, like: Mapping[str, np.ndarray[Any, Any]]) -> Params | None:
    """What ``state`` holds under ``key`` if it has exactly ``like``'s names and shapes; ``None`` when nothing
    was saved, or when it was made for another model (the client then starts over)."""
    saved = state.load(key)
    if saved is None or {n: a.shape for n, a in saved.items()} != {n: a.shape for n, a in like.items()}:
        return None
    return saved


class LocalAlgorithm(Protocol):
    """The client half of an algorithm: a ``fit`` instruction's reply and an ``evaluate`` instruction's.

    ``args`` are the JSON arguments the strategy put in the instruction (without ``name``); a bad one is a
    :class:`DecodeError` (the server sent something this client cannot use)."""

    def fit(self, client: Client, params: Params, config: FitConfig, args: Mapping[str, Any]) -> FitResult: ...

    def evaluate(self, client: Client, params: Params, args: Mapping[str, Any]) -> EvalResult: ...


class FitOnly:
    """For a local algorithm that changes only training: evaluation is the task's, on the client's test split."""

    def evaluate(self, client: Client, params: Params, args: Mapping[str, Any]) -> EvalResult:
        return client.task.evaluate(params, client.data.test)


#: The local algorithm of evaluation after local fine-tuning (``ClientSampling.finetune``).
FINETUNE = "finetune"


class FineTune:
    """Personalization by local fine-tuning, at evaluation: train the global model on the client's training
    split as ``args["fit"]`` (a :class:`FitConfig` as metadata) says, and report the fine-tuned model's test
    loss and metrics, with the global model's as ``global_loss`` and ``global_<metric>``. Nothing is kept: the
    fine-tuned model is evaluated and dropped. Training instructions are plain training."""

    def fit(self, client: Client, params: Params, config: FitConfig, args: Mapping[str, Any]) -> FitResult:
        return client.task.fit(params, client.data.train, config)

    def evaluate(self, client: Client, params: Params, args: Mapping[str, Any]) -> EvalResult:
        try:
            config = FitConfig.from_metadata(args.get("fit"))
        except ConfigError as exc:
            raise DecodeError(f"a fine-tuning instruction's 'fit': {exc}") from None
        before = client.task.evaluate(params, client.data.test)
        if before.num_examples == 0:
            return before  # nothing to evaluate on
        # a client with no training rows has nothing to fine-tune on: its personal model is the global one
        tuned = client.task.fit(params, client.data.train, config).params if len(client.data.train) else params
        after = client.task.evaluate(tuned, client.data.test)
        globals_ = {"global_loss": before.loss, **{f"global_{k}": v for k, v in before.metrics.items()}}
        return EvalResult(after.loss, after.num_examples, {**after.metrics, **globals_})


def with_local(message: Message, name: str, **args: Any) -> Message:
    """``message`` asking the client to run local algorithm ``name`` with JSON ``args``."""
    return Message(message.kind, message.params, {**message.metadata, "local": {"name": name, **args}})


def local_args(message: Message) -> tuple[str, dict[str, Any]] | None:
    """The local algorithm an instruction names and its arguments, or ``None`` for plain training."""
    local = message.metadata.get("local")
    if local is None:
        return None
    if not isinstance(local, Mapping) or not isinstance(local.get("name"), str):
        raise DecodeError(f"an instruction's 'local' must be an object with a string 'name', got {local!r}")
    args = {k: v for k, v in local.items() if k != "name"}
    return str(local["name"]), args
