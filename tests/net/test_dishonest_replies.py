"""Dishonest replies in a real deployment on 127.0.0.1 (issues 25 and 31): a site that answers an instruction whose
round is over, replays its last reply as the current one, answers a round with another round's update or with an
update built on another model, or sends the same reply twice.

The server is :func:`fedloom.serve` in this process (3 rounds of FedAvg on digits, softmax regression, no
federated evaluation); two honest sites run as one process of :func:`~fedloom.runtime.net.client.run_client`
threads; the dishonest site, ``mallory``, is a process of its own on a bare fleet stream, speaking the protocol
with fedloom's own frame helpers (``split_message``, ``Reassembler``, the fleet frames). Mallory trains honestly on
its own data each round and answers as an honest site does (an offer, then the chunks once granted; each reply
states what it answers, as the client agent's do), except in one round (2, or 3 for the last case; 2 and 3 for the
two replays), where it misbehaves as its mode says. It prints what it sees and does, one JSON line each.

Each run's model is compared with that of a reference run of the same federation in which mallory is honest, or
silent in the rounds it misbehaves in. For that comparison to be exact, the server's strategy folds each round's
updates in client order once they are all in (FedAvg's own fold, every update handed over counted, twice if twice),
so that two runs that aggregate the same updates end on the same bytes whichever reply came first; it also notes
each update it folds, which the tests hold against the run's privacy ledger and against what mallory sent.

Every bad reply is turned away saying which it is (out of turn, a duplicate of its reply to a round, a replay of an
earlier round's update, built on another model), recorded against mallory with the round, and never aggregated;
the honest sites stay in, and the run ends.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pytest
from test_deployment import Processes, free_port

import fedloom as fl
from fedloom.core.params import Params
from fedloom.core.results import FitResult
from fedloom.data import load_digits
from fedloom.data.clientfile import save_client_data
from fedloom.data.federate import federate
from fedloom.privacy.ledger import LEDGER_FILE, update_digest
from fedloom.strategy.base import FitFold
from fedloom.strategy.fedavg import FedAvgState
from fedloom.tracking import RunStore
from fedloom.tracking.tokens import TokenStore

# A server, an honest sites' process and a dishonest site's process talking gRPC on loopback.
pytestmark = pytest.mark.integration

HONEST = ("honest-1", "honest-2")
MALLORY = "mallory"
ROUNDS = 3
ROUND_TIMEOUT_S = 3.0  # what a round waits for a reply that does not come (mallory's, in some modes)
SLOW_FIT_S = 1.5  # how long the honest sites train in round 2 of the duplicate run: round 2 is open meanwhile
OUT_OF_TURN = "out of turn: it answers round 1, not round 2"
FIT = fl.FitConfig(local_epochs=1, batch_size=32, lr=0.1)

JOB = '''\
"""Softmax regression on digits; in round SLOW_ROUND (from the environment) each fit first sleeps SLOW_FIT_S s."""

import os
import time

import fedloom as fl
from fedloom.data import load_digits


class SlowTask:
    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def fit(self, *args, **kwargs):
        if str(fl.context.server_round) == os.environ.get("SLOW_ROUND"):
            time.sleep(float(os.environ["SLOW_FIT_S"]))
        return self.inner.fit(*args, **kwargs)


job = fl.Job(
    name="replies",
    task=SlowTask(fl.LogisticRegressionTask(num_features=64, num_classes=10)),
    data=load_digits,
    strategy=fl.FedAvg(fraction_evaluate=0.0, fit=fl.FitConfig(local_epochs=1, batch_size=32, lr=0.1)),
    simulation=fl.SimulationConfig(num_clients=3, rounds=3),
)
'''

# The honest sites: one run_client thread each, until the server says bye; prints how many instructions each answered.
HONEST_SITES = """\
import json, sys, threading
from fedloom.app.job import load_job
from fedloom.data.clientfile import load_client_data
from fedloom.runtime.client import client_app
from fedloom.runtime.net.client import run_client

job = load_job(sys.argv[1])
server, sites = sys.argv[2], json.loads(sys.argv[3])
answered = {}

def serve(name, token):
    data = load_client_data(f"parts/{name}.npz")
    answered[name] = run_client(client_app(job.task, deployed=True), data, server=server, token=token, retry_for=30)

threads = [threading.Thread(target=serve, args=item, daemon=True) for item in sites.items()]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join(timeout=40)
print(json.dumps(answered))
"""

MALLORY_SITE = '''\
"""A dishonest site on a bare fleet stream: python mallory.py ADDRESS TOKEN MODE ROUNDS.

It trains honestly each round (softmax regression on its own data, as the instruction says) and offers the
encoded FitResult, stating what it answers as fedloom's client agent does, under the instruction's message id,
one offer at a time (the next once the server has granted or declined the last), sending the chunks when granted;
except in the rounds r listed in ROUNDS (comma-separated), where MODE says what it does:

- honest: as in the other rounds; silent: nothing;
- stale_instead: offers its round-r reply under round r-1's id (whose round is over), not under round r's;
- stale_too: offers its round-r reply under round r-1's id, then under round r's;
- replay: offers, under round r's id, the exact bytes of the last reply it sent;
- restate: offers, under round r's id, its round r-1 update stated as an answer to round r (round, kind, model);
- old_model: trains on round r-1's model instead of round r's, and says so (its statement names that model);
- duplicate: offers its round-r reply, sends it when granted, and offers it again under the same id;
- resend: offers its round-r reply, and once granted sends its chunks twice.

It prints one JSON line per thing it sees or does, and ends on the server's bye or refusal, when the stream ends,
or after 40 s whatever happens.
"""

import json
import os
import queue
import sys
import threading

import grpc

from fedloom.core.codec import decode_message, encode_message
from fedloom.core.config import FitConfig
from fedloom.core.message import Message
from fedloom.data.clientfile import load_client_data
from fedloom.privacy.ledger import update_digest
from fedloom.runtime.binding import stated, statement
from fedloom.runtime.net import fleet_pb2
from fedloom.runtime.net.client import connect_call
from fedloom.runtime.net.frames import PROTOCOL_VERSION, Chunk, Reassembler, split_message
from fedloom.task.numpy_task import LogisticRegressionTask

address, token, mode = sys.argv[1], sys.argv[2], sys.argv[3]
at = {int(r) for r in sys.argv[4].split(",")}
watchdog = threading.Timer(40.0, os._exit, (3,))
watchdog.daemon = True
watchdog.start()


def say(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


task = LogisticRegressionTask(num_features=64, num_classes=10)
train = load_client_data("parts/mallory.npz").train
outbox = queue.Queue()
outbox.put(fleet_pb2.ClientFrame(hello=fleet_pb2.Hello(protocol_version=PROTOCOL_VERSION, token=token)))
channel = grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)])
frames = connect_call(channel)(iter(outbox.get, None))
reassembler = Reassembler(1 << 24)
ids = {}  # round -> the message id of its fit instruction
instructions = {}  # round -> the instruction
results = {}  # round -> mallory's honest FitResult
replies = {}  # round -> mallory's encoded reply to it
last_sent = []  # the bytes of the last reply sent
pending = []  # (message id, bytes) to offer, in order
offered = None  # the (message id, bytes) offered and not yet granted or declined


def offer_next():
    global offered
    if offered is None and pending:
        offered = pending.pop(0)
        say("offer", id=offered[0], size=len(offered[1]))
        outbox.put(fleet_pb2.ClientFrame(offer=fleet_pb2.Offer(message_id=offered[0], size=len(offered[1]))))


def fit(instruction):
    return task.fit(instruction.params, train, FitConfig.from_metadata(instruction.metadata["fit"]))


def answer(message_id, data):
    instruction = decode_message(data)
    server_round = instruction.metadata["round"]
    said = statement(instruction)
    result = fit(instruction)
    ids[server_round], instructions[server_round], results[server_round] = message_id, instruction, result
    replies[server_round] = encode_message(stated(result.to_message(), said))
    say("instruction", id=message_id, round=server_round, size=len(replies[server_round]),
        digest=update_digest(result.params))
    mine = (message_id, replies[server_round])
    before = server_round - 1
    if server_round not in at or mode in ("honest", "resend"):
        pending.append(mine)
    elif mode == "stale_instead":
        pending.append((ids[before], mine[1]))
    elif mode == "stale_too":
        pending.extend([(ids[before], mine[1]), mine])
    elif mode == "replay":
        pending.append((message_id, last_sent[-1]))
    elif mode == "restate":
        pending.append((message_id, encode_message(stated(results[before].to_message(), said))))
    elif mode == "old_model":
        old = fit(Message(instruction.kind, instructions[before].params, instruction.metadata))
        own = {**said, "model_sha256": update_digest(instructions[before].params)}
        pending.append((message_id, encode_message(stated(old.to_message(), own))))
    elif mode == "duplicate":
        pending.extend([mine, mine])
    if pending and pending[-1][0] == message_id:
        say("sends", id=message_id, digest=update_digest(decode_message(pending[-1][1]).params))
    offer_next()


try:
    for frame in frames:
        if isinstance(frame, Chunk):
            done = reassembler.feed(frame)
            if done is not None:
                answer(done[0], done[1])
            continue
        kind = frame.WhichOneof("frame")
        if kind == "welcome":
            say("welcome", name=frame.welcome.client_name)
        elif kind == "grant":
            granted, offered = offered, None
            say("grant", id=frame.grant.message_id)
            if granted is not None:
                last_sent.append(granted[1])
                twice = mode == "resend" and any(granted[0] == ids.get(r) for r in at)
                for _ in range(2 if twice else 1):
                    for chunk in split_message(granted[0], granted[1]):
                        outbox.put(chunk)
            offer_next()
        elif kind == "decline":
            offered = None
            say("decline", id=frame.decline.message_id, reason=frame.decline.reason)
            offer_next()
        elif kind == "notice":
            say("notice", text=frame.notice.text)
        else:
            say(kind, reason=frame.refusal.reason if kind == "refusal" else "")
            break
except grpc.RpcError as exc:
    say("stream-ended", code=str(exc.code()))
outbox.put(None)
frames.cancel()
sys.stdout.flush()
os._exit(0)  # at once: nothing of gRPC's teardown can keep it
'''


# -- the server's strategy: FedAvg folded in client order, noting what it folds --------------------------------


class _InClientOrder:
    """One round's FedAvg fold that holds the updates handed to it and folds them, in client order, when the round
    finishes; every update handed over is folded, twice if handed over twice. It notes (round, client, update
    digest) of each in ``folded``."""

    def __init__(self, inner: FitFold[FedAvgState], server_round: int, folded: list[tuple[int, str, str]]) -> None:
        self._inner = inner
        self._round = server_round
        self._folded = folded
        self._held: list[tuple[str, FitResult]] = []

    def add(self, client_id: str, result: FitResult) -> None:
        # A copy: the reply's arrays are views of a receive buffer that the server uses again once they are let go.
        params = Params({name: np.array(array) for name, array in result.params.items()})
        self._held.append((client_id, replace(result, params=params)))
        self._folded.append((self._round, client_id, update_digest(params)))

    def finish(self) -> tuple[FedAvgState, dict[str, float]]:
        for client_id, result in sorted(self._held, key=lambda held: held[0]):
            self._inner.add(client_id, result)
        return self._inner.finish()


@dataclass(frozen=True)
class _OrderedFedAvg(fl.FedAvg):
    """FedAvg whose float64 sums do not depend on which reply came first (see :class:`_InClientOrder`)."""

    folded: list[tuple[int, str, str]] = field(default_factory=list, repr=False, compare=False)

    def fold_fit(self, server_round: int, state: FedAvgState) -> _InClientOrder | None:
        inner = super().fold_fit(server_round, state)
        return None if inner is None else _InClientOrder(inner, server_round, self.folded)


# -- the federation and its runs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One run: what the server returned and recorded, what its strategy folded, what mallory saw and did."""

    run: fl.Run
    folded: list[tuple[int, str, str]]
    mallory: list[dict[str, Any]]
    answered: dict[str, int]  # by the honest sites
    status: str
    rounds: list[dict[str, Any]]
    records: list[dict[str, Any]]
    events: list[dict[str, Any]]
    ledger: list[dict[str, Any]]  # the updates the run used, as its privacy ledger lists them

    def said(self, event: str) -> list[dict[str, Any]]:
        """What mallory printed of ``event``."""
        return [line for line in self.mallory if line["event"] == event]

    def instruction(self, server_round: int) -> dict[str, Any]:
        """Mallory's fit instruction of ``server_round``: its message id, its reply's size and update digest."""
        (line,) = [line for line in self.said("instruction") if line["round"] == server_round]
        return line

    def folded_of(self, client_id: str) -> dict[int, list[str]]:
        """The digests of ``client_id``'s updates that the server folded, by round."""
        out: dict[int, list[str]] = {}
        for server_round, client, digest in self.folded:
            if client == client_id:
                out.setdefault(server_round, []).append(digest)
        return out

    def used_of(self, client_id: str) -> dict[int, list[str]]:
        """The digests of ``client_id``'s updates that the run's ledger says were used, by round."""
        out: dict[int, list[str]] = {}
        for entry in self.ledger:
            if entry["client"] == client_id:
                out.setdefault(entry["round"], []).append(entry["update_sha256"])
        return out

    def record(self, client_id: str, server_round: int) -> dict[str, Any]:
        (found,) = [
            r for r in self.records if (r["client_id"], r["round"], r["phase"]) == (client_id, server_round, "fit")
        ]
        return found

    def events_of(self, client_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["client_id"] == client_id]


class Federation:
    """The three sites' data and the job, in ``procs.cwd``; :meth:`outcome` runs the federation once per mode of
    mallory's (and keeps the outcome for the next test that asks)."""

    def __init__(self, procs: Processes) -> None:
        self.procs = procs
        (procs.cwd / "job.py").write_text(JOB)
        (procs.cwd / "honest.py").write_text(HONEST_SITES)
        (procs.cwd / "mallory.py").write_text(MALLORY_SITE)
        self.job = fl.load_job(str(procs.cwd / "job.py"))
        federation = federate(load_digits(), 3, fl.PartitionConfig(scheme="iid"), seed=5)
        for site, data in zip((*HONEST, MALLORY), federation.clients.values(), strict=True):
            save_client_data(procs.cwd / "parts" / f"{site}.npz", data)
        self._outcomes: dict[str, Outcome] = {}

    def outcome(self, mode: str, at: int | str = 2, *, slow: bool = False) -> Outcome:
        """The run in which mallory does as ``mode`` says in round ``at`` (or rounds: ``"2,3"``; see ``MALLORY_SITE``);
        with ``slow``, the honest sites train ``SLOW_FIT_S`` seconds in round 2."""
        key = f"{mode}-{at}" + ("-slow" if slow else "")
        if key not in self._outcomes:
            self._outcomes[key] = self._run(key, mode, at, slow)
        return self._outcomes[key]

    def _run(self, key: str, mode: str, at: int | str, slow: bool) -> Outcome:
        procs = self.procs
        run_dir = procs.cwd / key
        store = TokenStore(run_dir)
        try:
            tokens = {site: store.create(site) for site in (*HONEST, MALLORY)}
        finally:
            store.close()
        address = f"127.0.0.1:{free_port()}"
        honest = procs.start(
            *("honest.py", "job.py", address, json.dumps({site: tokens[site] for site in HONEST})),
            env={"SLOW_ROUND": "2", "SLOW_FIT_S": str(SLOW_FIT_S)} if slow else None,
            python=True,
        )
        mallory = procs.start("mallory.py", address, tokens[MALLORY], mode, str(at), python=True)
        strategy = _OrderedFedAvg(fraction_evaluate=0.0, fit=FIT)
        try:
            run = fl.serve(
                self.job,
                address=address,
                rounds=ROUNDS,
                min_clients=3,
                run_dir=run_dir,
                tls=fl.ServerTLS(insecure=True),
                seed=5,
                join_timeout=30,
                round_timeout=ROUND_TIMEOUT_S,
                strategy=strategy,
            )
        finally:  # each process ends by itself on the bye, or gives up within 40 s; killed if still running
            honest_done = procs.wait(honest, timeout=45)
            mallory_done = procs.wait(mallory, timeout=45)
        honest_done.ok()
        mallory_done.ok()
        runs = RunStore(procs.cwd)
        return Outcome(
            run=run,
            folded=list(strategy.folded),
            mallory=[json.loads(line) for line in mallory_done.stdout.splitlines()],
            answered=json.loads(honest_done.stdout),
            status=runs.info(str(run_dir)).status,
            rounds=runs.rounds(str(run_dir)),
            records=runs.client_metrics(str(run_dir)),
            events=runs.client_events(str(run_dir)),
            ledger=[json.loads(line) for line in (run_dir / LEDGER_FILE).read_text().splitlines()],
        )


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    procs = Processes(tmp_path_factory.mktemp("replies"))
    yield Federation(procs)
    procs.close()


def assert_the_run_ends_and_the_honest_sites_are_in_every_round(outcome: Outcome) -> None:
    assert outcome.status == "finished"
    assert [r["round"] for r in outcome.rounds] == [1, 2, 3]
    assert outcome.answered == dict.fromkeys(HONEST, ROUNDS)  # one fit a round, then the bye
    for client in (*HONEST, MALLORY):  # the run's ledger lists exactly the updates the strategy folded
        assert outcome.used_of(client) == outcome.folded_of(client)
    for site in HONEST:
        assert sorted(outcome.folded_of(site)) == [1, 2, 3]
        assert all(len(digests) == 1 for digests in outcome.folded_of(site).values())
        for server_round in (1, 2, 3):
            assert outcome.record(site, server_round)["status"] == "ok"


def assert_mallory_is_served_to_the_end(outcome: Outcome) -> None:
    """Mallory was never disconnected before the bye, and its round-3 reply, honest, was taken once."""
    assert [line["event"] for line in outcome.mallory][:1] == ["welcome"]
    assert outcome.mallory[-1] == {"event": "bye", "reason": ""}
    assert [e["event"] for e in outcome.events_of(MALLORY)].count("connected") == 1
    assert [e["event"] for e in outcome.events_of(MALLORY)][-1] == "disconnected"  # as the server said bye
    assert outcome.folded_of(MALLORY)[3] == [outcome.instruction(3)["digest"]]


def assert_no_round_waits_for_its_deadline(outcome: Outcome) -> None:
    assert all(r["seconds"] < ROUND_TIMEOUT_S for r in outcome.rounds), outcome.rounds


def assert_the_stale_offer_is_refused_unread_as_out_of_turn(stale: Outcome) -> None:
    """Mallory's round-2 update, offered under round 1's id, was declined unread as out of turn, and recorded once,
    with round 1 and the size offered."""
    first, second = stale.instruction(1), stale.instruction(2)
    assert _grants(stale, first["id"]) == 1  # round 1's reply; the stale offer is not granted
    assert _declines(stale, first["id"]) == [OUT_OF_TURN]
    (refused,) = _objections(stale)
    assert (refused["event"], refused["round"], refused["bytes"], refused["detail"]) == (
        "refused",
        1,
        second["size"],
        f"reply {first['id']}: {OUT_OF_TURN}",
    )


def _declines(outcome: Outcome, message_id: int) -> list[str]:
    return [line["reason"] for line in outcome.said("decline") if line["id"] == message_id]


def _grants(outcome: Outcome, message_id: int) -> int:
    return sum(1 for line in outcome.said("grant") if line["id"] == message_id)


def _objections(outcome: Outcome) -> list[dict[str, Any]]:
    """The server's events about replies of mallory's that it did not take: late or refused."""
    return [e for e in outcome.events_of(MALLORY) if e["event"] in ("late", "refused")]


# -- a reply under the id of an instruction whose round is over ------------------------------------------------


def test_an_update_under_the_last_rounds_id_instead_of_this_ones_is_declined_unread_as_out_of_turn(
    federation: Federation,
):
    """In round 2 mallory offers its round-2 update under round 1's message id, and nothing under round 2's. The
    server declines it before its bytes come, as out of turn (round 1's instruction was answered, and round 2's is
    open), records the refusal with round 1, drops mallory from round 2 at the deadline, and takes mallory's round-3
    reply: the model is the one of a run where mallory said nothing in round 2."""
    stale = federation.outcome("stale_instead")
    silent = federation.outcome("silent")
    for outcome in (stale, silent):
        assert_the_run_ends_and_the_honest_sites_are_in_every_round(outcome)
        assert_mallory_is_served_to_the_end(outcome)
    first, second = stale.instruction(1), stale.instruction(2)
    assert [(line["id"], line["size"]) for line in stale.said("offer")] == [
        (first["id"], first["size"]),
        (first["id"], second["size"]),  # round 2's update, under round 1's id
        (stale.instruction(3)["id"], stale.instruction(3)["size"]),
    ]
    assert_the_stale_offer_is_refused_unread_as_out_of_turn(stale)
    dropped = [e for e in stale.events_of(MALLORY) if e["event"] == "dropped"]
    assert [(e["round"], e["detail"]) for e in dropped] == [(2, "no reply by the deadline")]
    assert stale.record(MALLORY, 2)["status"] == "dropped"
    assert [r["seconds"] >= ROUND_TIMEOUT_S for r in stale.rounds] == [False, True, False]  # round 2 waited for it
    assert stale.folded_of(MALLORY) == {1: [first["digest"]], 3: [stale.instruction(3)["digest"]]}
    assert stale.run.params_sha256 == silent.run.params_sha256
    assert sorted(stale.folded) == sorted(silent.folded)  # the same updates, folded the same rounds


def test_an_update_sent_under_the_last_rounds_id_as_well_as_this_ones_is_declined_and_counts_once(
    federation: Federation,
):
    """In round 2 mallory offers its round-2 update under round 1's id, then under round 2's. The first is declined
    as out of turn and recorded with round 1, the second taken: the model is the one of a run where mallory is
    honest throughout."""
    stale = federation.outcome("stale_too")
    honest = federation.outcome("honest")
    for outcome in (stale, honest):
        assert_the_run_ends_and_the_honest_sites_are_in_every_round(outcome)
        assert_mallory_is_served_to_the_end(outcome)
    first, second = stale.instruction(1), stale.instruction(2)
    assert [line["id"] for line in stale.said("offer")] == [
        first["id"],
        first["id"],
        second["id"],
        stale.instruction(3)["id"],
    ]
    assert_the_stale_offer_is_refused_unread_as_out_of_turn(stale)
    assert stale.folded_of(MALLORY) == {s: [stale.instruction(s)["digest"]] for s in (1, 2, 3)}
    assert stale.record(MALLORY, 2)["status"] == "ok"
    assert not [e for e in stale.events_of(MALLORY) if e["event"] == "dropped"]
    assert_no_round_waits_for_its_deadline(stale)
    assert stale.run.params_sha256 == honest.run.params_sha256
    assert sorted(stale.folded) == sorted(honest.folded)


# -- an earlier round's reply or update under this round's id -------------------------------------------------


def test_a_replay_of_the_last_reply_at_two_rounds_is_refused_each_time_naming_the_round_it_first_came_in(
    federation: Federation,
):
    """In rounds 2 and 3 mallory sends, under each round's id, the exact bytes of the last reply it sent: its round-1
    reply. Each is read and refused as a replay of the update of round 1, recorded against mallory for that round
    and told to it; none is aggregated, no round waits for its deadline, and the model is the one of a run where
    mallory said nothing in rounds 2 and 3."""
    replay = federation.outcome("replay", "2,3")
    silent = federation.outcome("silent", "2,3")
    for outcome in (replay, silent):
        assert_the_run_ends_and_the_honest_sites_are_in_every_round(outcome)
    first = replay.instruction(1)
    assert [(line["id"], line["size"]) for line in replay.said("offer")] == [
        (replay.instruction(s)["id"], first["size"])
        for s in (1, 2, 3)  # round 1's bytes, three times
    ]
    assert [line["digest"] for line in replay.said("sends")] == [first["digest"]] * 3
    assert replay.folded_of(MALLORY) == {1: [first["digest"]]}
    why = "a replay: byte for byte the update it sent in round 1"
    for server_round in (2, 3):
        record = replay.record(MALLORY, server_round)
        assert (record["status"], record["detail"]) == ("refused", why)
    assert [line["text"] for line in replay.said("notice")] == [
        f"round {s}: the server refused your fit reply: {why}" for s in (2, 3)
    ]
    reported = [e["round"] for e in replay.events_of(MALLORY) if e["event"] == "reported"]
    assert reported == [1, 2, 3]  # read and handed to the loop, which refused them
    assert [(e["event"], e["round"], e["detail"]) for e in _objections(replay)] == [
        ("refused", 2, why),
        ("refused", 3, why),
    ]
    assert replay.mallory[-1] == {"event": "bye", "reason": ""}
    assert_no_round_waits_for_its_deadline(replay)
    assert replay.run.params_sha256 == silent.run.params_sha256
    assert sorted(replay.folded) == sorted(silent.folded)


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        ("restate", "a replay: byte for byte the update it sent in round 1"),
        ("old_model", "it was built on another model than the one sent for round 2"),
    ],
)
def test_an_answer_to_this_round_made_of_another_rounds_update_or_model_is_refused_saying_which(
    federation: Federation, mode: str, why: str
):
    """In round 2 mallory answers round 2's instruction, stating so, with its round-1 update (``restate``), or with
    an update it trained on round 1's model, which its statement names (``old_model``). The server refuses it saying
    which, records the refusal against mallory for round 2, and the model is the one of a run where mallory said
    nothing in round 2."""
    bad = federation.outcome(mode)
    silent = federation.outcome("silent")
    assert_the_run_ends_and_the_honest_sites_are_in_every_round(bad)
    assert_mallory_is_served_to_the_end(bad)
    record = bad.record(MALLORY, 2)
    assert record["status"] == "refused"
    assert record["detail"].startswith(why)
    (sent,) = [line for line in bad.said("sends") if line["id"] == bad.instruction(2)["id"]]
    assert sent["digest"] != bad.instruction(2)["digest"]  # not the update it trained for round 2
    assert 2 not in bad.folded_of(MALLORY)
    assert_no_round_waits_for_its_deadline(bad)
    assert bad.run.params_sha256 == silent.run.params_sha256
    assert sorted(bad.folded) == sorted(silent.folded)


# -- the same reply twice under one id --------------------------------------------------------------------------


def test_the_same_update_offered_again_in_time_is_declined_unread_as_a_duplicate_of_its_round_and_counts_once(
    federation: Federation,
):
    """In round 2 mallory sends its reply, then offers the same reply again under the same id while the honest
    sites still train (round 2 is open). The second offer is declined before its bytes come, as a duplicate of its
    reply to round 2, and recorded with that round; the update counts once: the model is the one of a run where
    mallory is honest."""
    duplicate = federation.outcome("duplicate", slow=True)
    honest = federation.outcome("honest")
    assert_the_run_ends_and_the_honest_sites_are_in_every_round(duplicate)
    assert_mallory_is_served_to_the_end(duplicate)
    second = duplicate.instruction(2)
    offers = [(line["id"], line["size"]) for line in duplicate.said("offer")]
    assert offers.count((second["id"], second["size"])) == 2
    assert _grants(duplicate, second["id"]) == 1
    assert _declines(duplicate, second["id"]) == ["a duplicate of its reply to round 2"]
    assert duplicate.folded_of(MALLORY) == {s: [duplicate.instruction(s)["digest"]] for s in (1, 2, 3)}
    assert duplicate.record(MALLORY, 2)["status"] == "ok"
    reported = [e for e in duplicate.events_of(MALLORY) if e["event"] == "reported"]
    assert [e["round"] for e in reported] == [1, 2, 3]
    (recorded,) = _objections(duplicate)  # the second offer, recorded once
    assert (recorded["event"], recorded["round"], recorded["bytes"], recorded["detail"]) == (
        "refused",
        2,
        second["size"],
        f"reply {second['id']}: a duplicate of its reply to round 2",
    )
    # It came in time: before the honest sites' round-2 replies, which closed the round.
    reported_in_round_2 = [e["at"] for e in duplicate.events if e["event"] == "reported" and e["round"] == 2]
    assert len(reported_in_round_2) == 3
    assert recorded["at"] < max(reported_in_round_2)
    assert_no_round_waits_for_its_deadline(duplicate)
    assert duplicate.run.params_sha256 == honest.run.params_sha256
    assert sorted(duplicate.folded) == sorted(honest.folded)


def test_the_same_update_sent_again_unoffered_ends_the_sites_session_and_counts_once(federation: Federation):
    """In round 3 mallory sends its reply when granted, then the same chunks again without offering them. The
    server refuses the second copy as chunks it did not ask for and ends mallory's session, telling it why; the
    first copy counts once, and the run ends on the model of a run where mallory is honest."""
    resend = federation.outcome("resend", 3)
    honest = federation.outcome("honest")
    assert_the_run_ends_and_the_honest_sites_are_in_every_round(resend)
    third = resend.instruction(3)
    assert _grants(resend, third["id"]) == 1
    reason = f"a chunk of message {third['id']}, which the server did not ask for"
    assert resend.mallory[-1] == {"event": "refusal", "reason": reason}
    assert resend.folded_of(MALLORY) == {s: [resend.instruction(s)["digest"]] for s in (1, 2, 3)}
    assert resend.record(MALLORY, 3)["status"] == "ok"
    (refused,) = _objections(resend)
    assert (refused["event"], refused["detail"]) == ("refused", f"malformed frame: {reason}")
    events = [e["event"] for e in resend.events_of(MALLORY)]
    assert events.count("connected") == 1
    assert events[-3:] == ["reported", "refused", "disconnected"]  # its round-3 reply, then the second copy
    assert resend.run.params_sha256 == honest.run.params_sha256
    assert sorted(resend.folded) == sorted(honest.folded)
    assert_no_round_waits_for_its_deadline(resend)
