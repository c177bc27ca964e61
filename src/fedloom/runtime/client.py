"""The client side, written once: a :class:`ClientApp` is the task inside a chain of mods.

Every runtime (the simulation backends, a deployed site) answers an instruction the same way: it calls its
client app with the message and a :class:`Context` (who the client is, its data, its state). The app passes
the message through its mods, outermost first; each mod may answer it itself, change it, change the reply, or
hand it on with ``call_next``; the last handler runs the task (:func:`handle_instruction`).

A mod is any callable ``mod(message, context, call_next) -> reply``::

    def no_evaluation(message, context, call_next):
        if message.kind == "evaluate":
            return decline("this site does not evaluate")
        return call_next(message, context)

Secure aggregation, Paillier aggregation, the clipping and noise of distributed DP and the telemetry a reply
carries are mods too (see :func:`fedloom.app.client_app` for the chain a run gives its clients). A mod that
holds state between messages (a secure aggregation round's keys) keeps it on itself: each runtime, and each
worker process of a simulation, holds its own copy of the app.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fedloom.core.errors import ConfigError, DecodeError
from fedloom.core.message import Message, MessageKind
from fedloom.core.params import Params
from fedloom.core.results import parse_instruction
from fedloom.data.base import ClientData
from fedloom.privacy.mods import protocol_mods
from fedloom.privacy.paillier import KeyPair
from fedloom.runtime import telemetry
from fedloom.runtime.state import DirectoryState
from fedloom.strategy.catalog import LOCAL_ALGORITHMS
from fedloom.strategy.local import Client, ClientState, local_args
from fedloom.task.base import Task

__all__ = [
    "ClientApp",
    "Context",
    "Handler",
    "Measure",
    "Mod",
    "answer_failures",
    "client_app",
    "decline",
    "handle_instruction",
]

_log = logging.getLogger("fedloom.client")


@dataclass
class Context:
    """What a mod knows of the client it answers for: its id, its data, where it keeps state between rounds
    (``None``: nowhere), and for a deployed site how many seconds the instruction took to arrive."""

    client_id: str
    data: ClientData
    state: ClientState | None = None
    received_seconds: float | None = None


#: The rest of the chain, as a mod sees it: call it with a message to get the reply.
Handler = Callable[[Message, Context], Message]
#: A client mod: ``mod(message, context, call_next) -> reply``.
Mod = Callable[[Message, Context, Handler], Message]


@dataclass(frozen=True)
class ClientApp:
    """What a client runs: ``task`` inside ``mods`` (outermost first). Calling it answers one instruction.

    Raises what :func:`handle_instruction` raises for the task's part, and whatever a mod raises; each runtime
    decides how to report it (a simulation ends the run, a deployed site answers with a failure).
    """

    task: Task
    mods: tuple[Mod, ...] = ()

    def __post_init__(self) -> None:
        for mod in self.mods:
            if not callable(mod):
                raise ConfigError(f"a client mod must be callable as mod(message, context, call_next); got {mod!r}")

    def __call__(self, message: Message, context: Context) -> Message:
        handler: Handler = self._task_handler
        for mod in reversed(self.mods):
            handler = _chained(mod, handler)
        return handler(message, context)

    def _task_handler(self, message: Message, context: Context) -> Message:
        return handle_instruction(self.task, context.data, message, context.state)

    @property
    def lockstep_safe(self) -> bool:
        """Whether every mod leaves a plain fit or evaluate alone (the built-in ones do), so that a backend may
        train such instructions in one batch without calling the chain (the vectorized backend)."""
        return all(getattr(mod, "passes_plain", False) for mod in self.mods)


def _chained(mod: Mod, call_next: Handler) -> Handler:
    def handler(message: Message, context: Context) -> Message:
        return mod(message, context, call_next)

    return handler


def decline(reason: str) -> Message:
    """The reply of a client that will not answer an instruction: the server records it as dropped for the
    phase, with ``reason``, and goes on (a mod returns this, rather than raising, which would end a simulation)."""
    return Message(MessageKind.FAILURE, metadata={"error": f"declined: {reason}"[:_MAX_REASON]})


_MAX_REASON = 2000


@dataclass(frozen=True)
class Measure:
    """The mod that measures each instruction (seconds, CPU, memory; ``fedloom.context`` metrics; log lines,
    unless ``send_logs`` is off) and puts it into the reply's metadata (:mod:`fedloom.runtime.telemetry`).
    Outermost in every run's chain; a protocol step that trains is measured once, as the step."""

    send_logs: bool = True
    passes_plain: bool = field(default=True, init=False, repr=False)

    def __call__(self, message: Message, context: Context, call_next: Handler) -> Message:
        if telemetry.active():
            return call_next(message, context)
        with telemetry.measure(message, received_seconds=context.received_seconds, send_logs=self.send_logs) as done:
            reply = call_next(message, context)
        return done.attach(reply)


def handle_instruction(task: Task, data: ClientData, message: Message, state: ClientState | None = None) -> Message:
    """The innermost handler of every client app: run a ``fit`` (on ``data.train``) or ``evaluate`` (on
    ``data.test``) instruction with ``task`` and return the reply.

    An instruction that names a local algorithm (SCAFFOLD, Ditto, ...; see :mod:`fedloom.strategy.local`) runs
    it with ``state``, this client's persistent state (a :class:`~fedloom.runtime.state.DirectoryState` as of
    this instruction's round: see :class:`~fedloom.runtime.state.RoundState`). Raises
    :class:`fedloom.core.errors.DecodeError` for a malformed instruction, a kind no mod answered (``secagg.*``
    without :class:`~fedloom.privacy.SecAggMod`) or an algorithm this client does not know, and :class:`ConfigError`
    when the algorithm keeps state and no ``state`` was given; whatever the task raises propagates.
    """
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


def answer_failures(message: Message, context: Context, call_next: Handler) -> Message:
    """The mod of a deployed site: a task (or mod) that raises is answered with a failure, which the server
    records at once as the client dropping with the error, instead of waiting for the round's deadline. The
    traceback goes to this site's log (and with the reply's log lines, inside :class:`Measure`)."""
    try:
        return call_next(message, context)
    except Exception as exc:
        _log.exception("the task failed on the %s instruction", message.kind)
        return telemetry.failure_message(exc)


answer_failures.passes_plain = True  # type: ignore[attr-defined]


def client_app(
    task: Task,
    mods: Sequence[Mod] = (),
    *,
    paillier_key: KeyPair | None = None,
    send_logs: bool = True,
    deployed: bool = False,
) -> ClientApp:
    """The app every fedloom client runs: ``task`` inside, outermost first, :class:`Measure` (telemetry, with
    ``send_logs``), for a ``deployed`` site :func:`answer_failures`, then the user's ``mods`` (the job's), then
    the protocol mods (:func:`fedloom.privacy.protocol_mods`: secure aggregation, Paillier aggregation with
    ``paillier_key``, distributed DP's clip and noise). A user mod thus sees every instruction, protocol steps
    (``secagg.*``, ``he.*``) included, and its time and log lines are the client's."""
    chain: list[Mod] = [Measure(send_logs)]
    if deployed:
        chain.append(answer_failures)
    chain.extend(mods)
    chain.extend(protocol_mods(paillier_key))
    return ClientApp(task, tuple(chain))
