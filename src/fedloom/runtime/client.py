"""The client side of a round, written once: turn an instruction into a task call and the result into a reply."""

from __future__ import annotations

from fedloom.core.errors import ConfigError, DecodeError
from fedloom.core.message import Message, MessageKind
from fedloom.core.params import Params
from fedloom.core.results import parse_instruction
from fedloom.data.base import ClientData
from fedloom.privacy.protocols import PROTOCOL_KINDS, ClientProtocols
from fedloom.runtime import telemetry
from fedloom.runtime.state import DirectoryState
from fedloom.strategy.catalog import LOCAL_ALGORITHMS
from fedloom.strategy.local import Client, ClientState, local_args
from fedloom.task.base import Task

__all__ = ["handle_instruction"]


def handle_instruction(
    task: Task,
    data: ClientData,
    message: Message,
    state: ClientState | None = None,
    protocols: ClientProtocols | None = None,
) -> Message:
    """Run a ``fit`` (on ``data.train``) or ``evaluate`` (on ``data.test``) instruction and return the reply.

    A step of secure aggregation (``secagg.*``) or of Paillier aggregation (``he.*``) is answered by
    ``protocols``, the runtime's :class:`~fedloom.privacy.ClientProtocols`, which trains through this function when
    its step comes; a runtime that gives none cannot take part (:class:`ConfigError`).

    An instruction that names a local algorithm (SCAFFOLD, Ditto, ...; see :mod:`fedloom.strategy.local`) runs
    it with ``state``, this client's persistent state (a :class:`~fedloom.runtime.state.DirectoryState` as of
    this instruction's round: see :class:`~fedloom.runtime.state.RoundState`). Raises
    :class:`fedloom.core.errors.DecodeError` for a malformed instruction or an algorithm this client does not
    know, and :class:`ConfigError` when the algorithm keeps state and no ``state`` was given; whatever the task
    raises propagates, so each runtime decides how to report it.

    The reply carries the client's telemetry for this instruction (system metrics, ``fedloom.context`` metrics,
    log lines: :mod:`fedloom.runtime.telemetry`), unless the caller measures it itself around this call.
    """
    if telemetry.active():  # a protocol step that trains, or a runtime that measures the instruction itself
        return _answer(task, data, message, state, protocols)
    with telemetry.measure(message) as capture:
        reply = _answer(task, data, message, state, protocols)
    return capture.attach(reply)


def _answer(
    task: Task,
    data: ClientData,
    message: Message,
    state: ClientState | None,
    protocols: ClientProtocols | None,
) -> Message:
    if message.kind in PROTOCOL_KINDS:
        if protocols is None:
            raise ConfigError(f"this client runtime keeps no secure aggregation state, and was sent {message.kind}")
        return protocols.answer(message, lambda fit: handle_instruction(task, data, fit, state))
    kind, server_round, params, fit_config = parse_instruction(message)
    local = local_args(message)
    if local is None:
        if kind == MessageKind.FIT:
            assert fit_config is not None
            return task.fit(params, data.train, fit_config).to_message()
        return task.evaluate(params, data.test).to_message()
    name, args = local
    algorithm = LOCAL_ALGORITHMS.get(name)
    if algorithm is None:
        known = ", ".join(sorted(LOCAL_ALGORITHMS))
        raise DecodeError(f"the server asks for local algorithm {name!r}, which this client does not have ({known})")
    if isinstance(state, DirectoryState):  # what this round saves counts once the server is past it
        state = state.at_round(server_round, kind)
    client = Client(task, data, state if state is not None else _NoState(name))
    if kind == MessageKind.FIT:
        assert fit_config is not None
        return algorithm.fit(client, params, fit_config, args).to_message()
    return algorithm.evaluate(client, params, args).to_message()


class _NoState:
    """The state of a client that has no state folder: an algorithm that keeps state cannot run there."""

    def __init__(self, algorithm: str) -> None:
        self._algorithm = algorithm

    def load(self, key: str) -> Params | None:
        raise self._missing()

    def save(self, key: str, params: Params) -> None:
        raise self._missing()

    def _missing(self) -> ConfigError:
        return ConfigError(
            f"local algorithm {self._algorithm!r} keeps client state, and this client has no state folder"
        )
