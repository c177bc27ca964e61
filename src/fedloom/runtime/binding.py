"""Replies bound to what they answer: what a reply states about its instruction, and the updates a client sent.

A deployed site's runtime (the client agent, :mod:`fedloom.runtime.net.client`) states in each reply's metadata,
under :data:`ANSWERS`, the instruction it answers: its round, its kind, and the SHA-256 of the model (the params)
the runtime gave the task, hashed before the task sees them (:func:`statement`) and put into the reply after the
app returns (:func:`stated`), so neither the task nor a mod can change it. The server loops hold each statement
against what they sent that client (:func:`misstated`) and refuse, saying which, a reply that answers another
round or instruction, or was built on another model; on a grid whose replies are bound
(:class:`~fedloom.runtime.grid.Binding`: a deployment) a reply that states nothing is refused too. A simulated
client states nothing: the backend calls it with the instruction and takes what it returns, so its reply cannot
answer anything else, and a simulation does not hash the model once per client.

Where replies are bound, whatever a reply states, the server also remembers the digest of every fit update each
client sent in the run (:class:`SentUpdates`; the same digest the privacy ledger records, reloaded from it when a
run resumes) and refuses one byte-identical to an update that client already sent, naming the round it first came
in: a replay. An update equal to the params the client was sent is no replay: a client whose training changed
nothing (a free-rider that returns the model it was given) repeats itself honestly whenever the global model stands
still, and it brings nothing of another round. A task whose update does not depend on the model it is given (a
closed-form local statistic) sends the same bytes every round: in a deployment that cannot be told from a replay,
and is refused from the second round on. A simulation, where nothing can replay, takes such updates as before
(see :class:`Vetting`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from fedloom.core.message import Message
from fedloom.core.params import Params
from fedloom.privacy.ledger import update_digest
from fedloom.runtime.grid import Binding, Grid

__all__ = ["ANSWERS", "ModelDigests", "ReplyCheck", "SentUpdates", "Vetting", "misstated", "statement", "stated"]

#: The reply metadata key under which a deployed site's runtime states what the reply answers.
ANSWERS = "answers"


def _round_of(instruction: Message) -> int | None:
    server_round = instruction.metadata.get("round")
    return server_round if isinstance(server_round, int) and not isinstance(server_round, bool) else None


def statement(instruction: Message) -> dict[str, Any]:
    """What a reply to ``instruction`` states: the instruction's round (``None`` where it has none), its kind, and
    the SHA-256 of its params (:func:`~fedloom.privacy.ledger.update_digest`), the model the task is given. Call it
    before the task runs."""
    return {
        "round": _round_of(instruction),
        "kind": instruction.kind,
        "model_sha256": update_digest(instruction.params),
    }


def stated(reply: Message, said: Mapping[str, Any]) -> Message:
    """``reply`` with ``said`` (a :func:`statement`) in its metadata, in place of whatever the task or a mod put
    there under :data:`ANSWERS`."""
    return replace(reply, metadata={**reply.metadata, ANSWERS: dict(said)})


class ModelDigests:
    """The :func:`~fedloom.privacy.ledger.update_digest` of each params object sent, computed once per object: every
    client of a FedAvg round is sent the same one (a strategy that sends per-client params gets one digest per
    client). It holds the params it hashed, so an object's id is never taken for another's; keep one per phase."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[Params, str]] = {}

    def __call__(self, params: Params) -> str:
        held = self._seen.get(id(params))
        if held is None or held[0] is not params:
            held = self._seen[id(params)] = (params, update_digest(params))
        return held[1]


def misstated(reply: Message, instruction: Message, digests: ModelDigests, *, required: bool) -> str | None:
    """Why ``reply`` is not, by its own statement (:data:`ANSWERS`), an answer to ``instruction``; ``None`` where it
    is, or where it states nothing and ``required`` is off. The model's digest is computed only for a reply that
    states one (once per params object, by ``digests``)."""
    said = reply.metadata.get(ANSWERS)
    if said is None:
        if not required:
            return None
        return "it does not say which instruction it answers (is the site's fedloom older than the server's?)"
    if not isinstance(said, Mapping):
        return f"what it says it answers is not a statement: {str(said)[:80]!r}"
    sent_round = _round_of(instruction)
    if said.get("round") != sent_round:
        return f"out of turn: it answers round {str(said.get('round'))[:20]}, not round {sent_round}"
    if said.get("kind") != instruction.kind:
        kind = str(said.get("kind"))[:40]
        return f"it answers an instruction of kind {kind!r}, not the {instruction.kind!r} it was sent"
    model = digests(instruction.params)
    if said.get("model_sha256") != model:
        claimed = str(said.get("model_sha256"))[:16]
        return (
            f"it was built on another model than the one sent for round {sent_round} "
            f"(SHA-256 {claimed}..., not {model[:16]}...)"
        )
    return None


class SentUpdates:
    """The digest of every fit update each client sent in a run, with the round it first came in: one 64-hex string
    per client per round. ``earlier`` seeds it (client -> digest -> round), for a resumed run.

    >>> sent = SentUpdates()
    >>> sent.replayed("a", "d1", 1, lambda: "m1") is None
    True
    >>> sent.replayed("a", "d1", 2, lambda: "m2")
    'a replay: byte for byte the update it sent in round 1'
    """

    def __init__(self, earlier: Mapping[str, Mapping[str, int]] | None = None) -> None:
        self._first: dict[str, dict[str, int]] = {cid: dict(seen) for cid, seen in (earlier or {}).items()}

    def replayed(self, client_id: str, digest: str, server_round: int, sent_digest: Callable[[], str]) -> str | None:
        """Note that ``client_id`` sent the update ``digest`` in ``server_round``, and say why it is refused where it
        is byte-identical to an update that client already sent, unless it is the params it was sent (whose digest
        ``sent_digest()`` gives, asked only then); ``None`` where it is new."""
        mine = self._first.setdefault(client_id, {})
        first = mine.get(digest)
        if first is None:
            mine[digest] = server_round
            return None
        if digest == sent_digest():
            return None
        return f"a replay: byte for byte the update it sent in round {first}"


class ReplyCheck:
    """One phase's check of each reply against what it answers (what the server loops call): a fit update that
    replays one of the client's earlier updates (where ``updates`` are kept), then a reply whose statement differs
    from its instruction, or states nothing where ``required`` (:func:`misstated`). The model sent is hashed once
    per params object, and only where a reply states one or a replay must be told from an unchanged model."""

    def __init__(self, server_round: int, updates: SentUpdates | None, *, required: bool) -> None:
        self._round = server_round
        self._updates = updates
        self._required = required
        self._digests = ModelDigests()

    def refusal(self, client_id: str, reply: Message, instruction: Message, update: str | None = None) -> str | None:
        """Why the server refuses ``reply``, ``client_id``'s answer to ``instruction`` (``update``: the digest of the
        fit update it carries, if any), or ``None`` where it takes it."""
        if update is not None and self._updates is not None:
            why = self._updates.replayed(client_id, update, self._round, lambda: self._digests(instruction.params))
            if why is not None:
                return why
        return misstated(reply, instruction, self._digests, required=self._required)


@dataclass(frozen=True)
class Vetting:
    """What a run's loop holds against the replies it gathers: whether its grid binds replies to what they answer
    (``bound``: every reply must state it), and then the fit updates each client sent so far, against replays
    (``updates``).

    Replays are looked for only where replies are bound, that is where clients are other parties (a deployment). A
    simulation runs every client's task itself and takes what it returns: nothing there can replay, and an update
    the same as an earlier one is the task's own doing (a task whose update does not depend on the model it is
    given, as a closed-form local statistic, sends the same bytes every round), so it is taken as before."""

    updates: SentUpdates | None
    bound: bool

    @classmethod
    def of(cls, grid: Grid, earlier: Mapping[str, Mapping[str, int]] | None = None) -> Vetting:
        """The vetting of a run over ``grid``; ``earlier``: the updates sent before a resume (see
        :class:`SentUpdates`)."""
        bound = isinstance(grid, Binding) and grid.binds_replies
        return cls(SentUpdates(earlier) if bound else None, bound)

    def check(self, server_round: int) -> ReplyCheck:
        """The check of one phase's replies in ``server_round``."""
        return ReplyCheck(server_round, self.updates, required=self.bound)
