"""The client side of a round, written once: turn an instruction into a task call and the result into a reply."""

from __future__ import annotations

from fedloom.core.message import Message, MessageKind
from fedloom.core.results import parse_instruction
from fedloom.data.base import ClientData
from fedloom.task.base import Task

__all__ = ["handle_instruction"]


def handle_instruction(task: Task, data: ClientData, message: Message) -> Message:
    """Run a ``fit`` (on ``data.train``) or ``evaluate`` (on ``data.test``) instruction and return the reply.

    Raises :class:`fedloom.core.errors.DecodeError` for a malformed instruction; whatever the task raises
    propagates, so each runtime decides how to report it.
    """
    kind, _round, params, fit_config = parse_instruction(message)
    if kind == MessageKind.FIT:
        assert fit_config is not None
        return task.fit(params, data.train, fit_config).to_message()
    return task.evaluate(params, data.test).to_message()
