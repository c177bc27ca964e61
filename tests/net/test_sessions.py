"""One live session per site, and what a site declares when it joins.

A second connection that presents the token of a connected site is refused while the site's session answers the
server's ping (training or not), and takes its place when it does not; under mutual TLS a connection with the
site's certificate is the site itself and replaces its session. The hello declares the site's training examples,
which the server's grid gives back (``Declaring``).

Most tests run a :class:`FleetServer` in this process with raw fleet streams (``_RawClient``) or client agents
(``run_client``) in threads; the last runs ``fedloom server`` and ``fedloom client`` processes, as in
``test_deployment.py``, with an intruder that holds a site's token.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from test_deployment import Processes, _RawClient, free_port, wait_until
from test_faults import SLOW_JOB, final_error, tokens

import fedloom as fl
from fedloom.core.errors import TransportError
from fedloom.core.message import Message
from fedloom.core.params import Params
from fedloom.data.base import ArrayData, ClientData
from fedloom.runtime.client import ClientApp, Context, Handler
from fedloom.runtime.grid import Declaring
from fedloom.runtime.net.client import run_client
from fedloom.runtime.net.server import LIVE_SESSION, FleetServer
from fedloom.runtime.net.tls import channel_credentials, init_certs, server_credentials
from fedloom.tracking import RunStore

# A gRPC server on loopback in every test, and fedloom processes in the last one.
pytestmark = pytest.mark.integration

PEER = r"ipv4:127\.0\.0\.1:\d+"
MESSAGE = Message("fit", Params({"w": np.arange(4, dtype=np.float32)}), {"round": 1})


def _site_data(examples: int) -> ClientData:
    return ClientData(
        ArrayData(np.zeros((examples, 2), np.float32), np.zeros(examples, np.int64)),
        ArrayData(np.zeros((3, 2), np.float32), np.zeros(3, np.int64)),
    )


def _echo_app(train_s: float = 0.0) -> ClientApp:
    """An app that takes ``train_s`` seconds (in the agent's training thread) and answers with the instruction."""

    def echo(message: Message, context: Context, call_next: Handler) -> Message:
        time.sleep(train_s)
        return message

    return ClientApp(fl.LogisticRegressionTask(num_features=2, num_classes=2), (echo,))


class _Agent(threading.Thread):
    """``run_client`` in a thread of this process; what it returned or raised is kept."""

    def __init__(
        self, address: str, token: str, app: ClientApp, data: ClientData, credentials: grpc.ChannelCredentials | None
    ) -> None:
        super().__init__(daemon=True)
        self._args = (address, token, app, data, credentials)
        self.answered: int | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        address, token, app, data, credentials = self._args
        try:
            self.answered = run_client(app, data, server=address, token=token, retry_for=10, credentials=credentials)
        except BaseException as exc:  # the test reads it
            self.error = exc


def _events(server: FleetServer, site: str) -> list[tuple[str, str | None]]:
    return [(e.event, e.detail) for e in server.take_events() if e.client_id == site]


@pytest.fixture
def address() -> str:
    return f"127.0.0.1:{free_port()}"


def test_a_second_connection_with_the_token_of_a_site_that_answers_is_refused(address: str, caplog):
    with FleetServer(address, authenticate=lambda token: token) as server:
        site = _RawClient(address, "site", echo=True, examples=120)
        intruder = None
        try:
            server.wait_for_clients(1, timeout=30)
            intruder = _RawClient(address, "site", echo=True, examples=10**6)
            wait_until(lambda: intruder.refusals, 15, "the intruder's refusal")
            assert intruder.refusals == [LIVE_SESSION]
            assert "127.0.0.1" not in LIVE_SESSION  # the newcomer learns nothing of the site
            assert not intruder.welcomed.is_set()
            assert (site.pings, site.refusals) == (1, [])
            assert list(server.grid.client_ids()) == ["site"]
            assert server.grid.declared_examples("site") == 120  # the refused hello declares nothing
            assert list(server.grid.send_and_receive({"site": MESSAGE}, timeout=30).replies) == ["site"]

            warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
            said = [
                re.fullmatch(
                    rf"client site: refused a second connection from ({PEER}) with its token: its "
                    rf"session from ({PEER}) answers \(.*token may have leaked\)",
                    w,
                )
                for w in warnings
            ]
            found = [m for m in said if m]
            assert len(found) == 1, warnings
            assert found[0].group(1) != found[0].group(2)
            events = _events(server, "site")
            assert [e for e, _ in events][:2] == ["connected", "refused"]
            assert "disconnected" not in [e for e, _ in events]
            assert events[1][1] == f"a second connection from {found[0].group(1)}: {LIVE_SESSION}"
        finally:
            for client in (site, intruder):
                if client is not None:
                    client.close()


def test_a_session_that_stops_answering_is_replaced_by_the_new_connection(address: str, caplog):
    # A stream that is open but whose client no longer answers: a frozen process, a network gone dark.
    with FleetServer(address, heartbeat=2.0, authenticate=lambda token: token) as server:  # probes wait 2 s
        stale = _RawClient(address, "site", echo=False, pongs=False, examples=10)
        fresh = None
        try:
            server.wait_for_clients(1, timeout=30)
            started = time.monotonic()
            fresh = _RawClient(address, "site", echo=True, examples=20)
            assert fresh.welcomed.wait(15)
            assert time.monotonic() - started >= 1.9  # it waited for the probe to go unanswered
            assert (stale.pings, stale.refusals, fresh.refusals) == (1, [], [])
            assert list(server.grid.client_ids()) == ["site"]
            assert server.grid.declared_examples("site") == 20
            exchange = server.grid.send_and_receive({"site": MESSAGE}, timeout=30)
            assert list(exchange.replies) == ["site"]  # from the new connection: the stale one echoes nothing
            assert re.search(
                rf"client site: its session from {PEER} stopped answering; a new connection from {PEER} takes its "
                "place",
                caplog.text,
            )
            events = _events(server, "site")
            assert [e for e, _ in events][:3] == ["connected", "disconnected", "connected"]
            assert re.fullmatch(rf"stopped answering; replaced by a new connection from {PEER}", events[1][1] or "")
        finally:
            for client in (stale, fresh):
                if client is not None:
                    client.close()


def test_a_site_busy_training_answers_from_its_reading_thread_and_keeps_its_place(address: str):
    # The site trains for 4 s; the intruder comes 1 s in; the probe would give up 2 s later, mid-training.
    with FleetServer(address, heartbeat=2.0, authenticate=lambda token: token) as server:
        agent = _Agent(address, "site", _echo_app(train_s=4.0), _site_data(30), None)
        intruder = None
        try:
            server.wait_for_clients(1, timeout=30)
            exchanges = []
            exchanging = threading.Thread(
                target=lambda: exchanges.append(server.grid.send_and_receive({"site": MESSAGE}, timeout=60))
            )
            exchanging.start()
            time.sleep(1.0)
            intruder = _RawClient(address, "site", echo=True)
            wait_until(lambda: intruder.refusals, 15, "the intruder's refusal")
            assert exchanging.is_alive()  # refused while the site was still training
            assert intruder.refusals == [LIVE_SESSION]
            exchanging.join(timeout=60)
            assert list(exchanges[0].replies) == ["site"]
            server.say_bye()
            agent.join(timeout=30)
            assert (agent.answered, agent.error) == (1, None)
        finally:
            if intruder is not None:
                intruder.close()


def test_under_mutual_tls_a_restart_with_the_sites_certificate_replaces_its_session(address: str, tmp_path: Path):
    init_certs(tmp_path, ["127.0.0.1"], ["site"])
    ours = channel_credentials(
        tmp_path / "ca.pem", tmp_path / "clients" / "site.pem", tmp_path / "clients" / "site.key"
    )
    with FleetServer(
        address, authenticate=lambda token: token, credentials=server_credentials(tmp_path, mutual=True)
    ) as server:
        first = _Agent(address, "site", _echo_app(), _site_data(30), ours)
        server.wait_for_clients(1, timeout=30)
        second = _Agent(address, "site", _echo_app(), _site_data(40), ours)
        first.join(timeout=30)  # it answers pings, so only the certificate can have pushed it out
        assert isinstance(first.error, TransportError)
        assert str(first.error).endswith(
            "ended the session of 'site': this site connected again with its certificate; this older connection is "
            "closed"
        )
        wait_until(lambda: server.grid.declared_examples("site") == 40, 15, "the restart's session")
        assert list(server.grid.send_and_receive({"site": MESSAGE}, timeout=30).replies) == ["site"]
        server.say_bye()
        second.join(timeout=30)
        assert (second.answered, second.error) == (1, None)
        events = _events(server, "site")
        assert [e for e, _ in events][:3] == ["connected", "disconnected", "connected"]
        assert re.fullmatch(
            rf"replaced by a new connection from {PEER} with the site's certificate", events[1][1] or ""
        )


def test_the_grid_gives_the_training_examples_each_site_declared_in_its_hello(address: str):
    with FleetServer(address, authenticate=lambda token: token) as server:
        agent = _Agent(address, "site", _echo_app(), _site_data(37), None)
        quiet = _RawClient(address, "quiet", echo=False)  # declares nothing
        try:
            server.wait_for_clients(2, timeout=30)
            grid = server.grid
            assert isinstance(grid, Declaring)
            assert grid.declared_examples("site") == 37  # its data's training split, filled in by the agent
            assert grid.declared_examples("quiet") is None
            assert grid.declared_examples("nobody") is None
            connected = dict(_events(server, "site"))["connected"]
            assert re.fullmatch(rf"{PEER}; declared 37 training examples", connected or "")
        finally:
            quiet.close()
        server.say_bye()
        agent.join(timeout=30)
        assert grid.declared_examples("site") == 37  # kept for the site it was, after it left


# -- real processes ------------------------------------------------------------------------------------------

SITES = ("client-000", "client-001", "client-002")


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    runner = Processes(tmp_path_factory.mktemp("sessions"))
    (runner.cwd / "slow_digits.py").write_text(SLOW_JOB)
    yield runner
    runner.close()


def test_an_intruder_with_a_sites_token_is_refused_and_the_run_ends_as_without_it(procs: Processes):
    """Three sites (the job of ``test_faults.py``); client-000 waits in its first fit (``GATE``) until the
    intruder, a second `fedloom client` with client-000's token, has been refused and has exited. The site stays
    in every round, and the run ends on the model of a simulation of the same job and seed."""
    victim = SITES[0]
    procs.run("partition", "digits", "--clients", "3", "--seed", "5", "--out", "parts").ok()
    keys = tokens(procs, "intruded", SITES)
    simulation = procs.start(
        *("simulate", "slow_digits.py", "--clients", "3", "--rounds", "2", "--seed", "5", "--backend", "inline"),
        *("--quiet", "--out", "sim"),
    )
    address = f"127.0.0.1:{free_port()}"
    server = procs.start(
        *("server", "slow_digits.py", "--address", address, "--rounds", "2", "--min-clients", "3", "--seed", "5"),
        *("--run-dir", "intruded", "--insecure", "--join-timeout", "60", "--round-timeout", "120"),
    )

    def client(site: str, data: str, **env: str) -> int:
        args = ("client", "slow_digits.py", "--server", address, "--data", f"parts/{data}.npz", "--token", keys[site])
        return procs.start(*args, "--insecure", env=env)

    gate = procs.cwd / "intruder-gone"
    sites = {site: client(site, site, **({"GATE": str(gate)} if site == victim else {})) for site in SITES}
    wait_until(lambda: "clients connected" in procs.output(server), 90, "three sites")
    intruder = procs.wait(client(victim, SITES[1]), timeout=60)  # the victim waits in its fit meanwhile
    gate.touch()

    refusal = final_error(intruder)
    assert refusal == f"the server at {address} refused this client: {LIVE_SESSION}"
    done = procs.wait(server).ok()
    assert done.sha256() == procs.wait(simulation).ok().sha256()
    said = re.findall(
        rf"WARNING fedloom\.server: client {victim}: refused a second connection from ({PEER}) with its token: its "
        rf"session from ({PEER}) answers",
        done.stderr,
    )
    assert len(said) == 1, done
    assert said[0][0] != said[0][1]
    for handle in sites.values():
        assert "answered 4 instructions" in procs.wait(handle).ok().stdout  # no site was pushed out

    run = str(procs.cwd / "intruded")
    records = RunStore(procs.cwd)
    assert [r["num_ok"] for r in records.rounds(run)] == [3, 3]
    fits = {(m["round"], m["client_id"]): m["status"] for m in records.client_metrics(run) if m["phase"] == "fit"}
    assert fits[(1, victim)] == fits[(2, victim)] == "ok"
    events = [e for e in records.client_events(run) if e["client_id"] == victim]
    assert [e["event"] for e in events].count("connected") == 1
    refused = [e for e in events if e["event"] == "refused"]
    assert len(refused) == 1
    assert refused[0]["detail"].endswith(LIVE_SESSION)
