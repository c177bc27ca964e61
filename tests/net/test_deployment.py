"""A real deployment on 127.0.0.1: ``fedloom server`` and ``fedloom client`` processes, against ``simulate``.

Every process gets a hermetic environment (as in ``tests/cli``), writes its output to files (no pipe can
fill up and stall it), is waited for with a timeout, and is killed in teardown if it is still running.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

import fedloom
from fedloom.app.deployment import CLIENT_TLS_MISSING, SERVER_TLS_MISSING
from fedloom.core.checkpoint import load_params
from fedloom.core.codec import encode_message
from fedloom.core.message import Message
from fedloom.core.params import Params
from fedloom.data.base import ArrayData, ClientData
from fedloom.data.clientfile import load_client_data, save_client_data
from fedloom.runtime.net import fleet_pb2
from fedloom.runtime.net.client import connect_call
from fedloom.runtime.net.frames import PROTOCOL_VERSION, Chunk, Reassembler, split_message
from fedloom.runtime.net.server import FleetServer
from fedloom.runtime.net.tls import init_certs
from fedloom.runtime.records import RoundRecord
from fedloom.tracking import RunStore
from fedloom.tracking.tokens import TokenStore

# Servers and clients run as fedloom processes talking gRPC on loopback.
pytestmark = pytest.mark.integration

WAIT_S = 120
SHA256_LINE = re.compile(r"^params_sha256 ([0-9a-f]{64})$", re.MULTILINE)
RUN_DIR_LINE = re.compile(r"^run directory (\S+)$", re.MULTILINE)
_PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
_UNSET_VARS = ("FEDLOOM_DATA", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "no_proxy", "NO_PROXY")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fedloom_command() -> list[str]:
    beside = Path(sys.executable).with_name("fedloom")
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("fedloom")
    return [found] if found else [sys.executable, "-c", "from fedloom.cli.main import main; main()"]


@dataclass(frozen=True)
class Done:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        command = f"$ fedloom {' '.join(self.args)}\n[exit {self.returncode}]"
        return f"{command}\n--- stdout\n{self.stdout}--- stderr\n{self.stderr}"

    def ok(self) -> Done:
        assert self.returncode == 0, self
        assert "Traceback" not in self.stderr, self
        return self

    def error(self) -> str:
        """The message of fedloom's one-line error (exit code 2, nothing else on stderr)."""
        assert self.returncode == 2, self
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1, self
        assert lines[0].startswith("error: "), self
        return lines[0].removeprefix("error: ")

    def sha256(self) -> str:
        found = SHA256_LINE.findall(self.stdout)
        assert len(found) == 1, self
        return str(found[0])


class Processes:
    """Starts ``fedloom`` processes in ``cwd`` and kills whatever is still running at :meth:`close`."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        env = {k: v for k, v in os.environ.items() if k not in _UNSET_VARS}
        env.update(dict.fromkeys(_PROXY_VARS, "http://127.0.0.1:9"))
        env.update(FEDLOOM_CACHE=str(cwd / "cache"), COLUMNS="250", NO_COLOR="1", PYTHONIOENCODING="utf-8")
        # gRPC honours the proxy variables (a site may need its proxy to reach the server); loopback is direct.
        env.update(no_proxy="127.0.0.1,localhost")
        self.env = env
        self._running: list[tuple[tuple[str, ...], subprocess.Popen[bytes], Path]] = []
        self._count = 0

    def start(
        self, *args: str | Path, env: dict[str, str] | None = None, python: bool = False, prefix: Sequence[str] = ()
    ) -> int:
        """Start ``fedloom ARGS`` (``python ARGS`` with ``python``) with ``env`` added to the environment, under
        the command ``prefix`` if one is given (``nsenter ...``); returns a handle for :meth:`wait`."""
        self._count += 1
        out = self.cwd / f"proc-{self._count}"
        command = [*prefix, *([sys.executable] if python else fedloom_command())]
        with open(f"{out}.out", "wb") as stdout, open(f"{out}.err", "wb") as stderr:
            proc = subprocess.Popen(
                [*command, *map(str, args)],
                cwd=self.cwd,
                env={**self.env, **(env or {})},
                stdout=stdout,
                stderr=stderr,
            )
        self._running.append((tuple(map(str, args)), proc, out))
        return len(self._running) - 1

    def wait(self, handle: int, timeout: float = WAIT_S) -> Done:
        args, proc, out = self._running[handle]
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        stdout = Path(f"{out}.out").read_text(encoding="utf-8")
        stderr = Path(f"{out}.err").read_text(encoding="utf-8")
        return Done(args, proc.returncode, stdout, stderr)

    def run(self, *args: str | Path, timeout: float = WAIT_S, prefix: Sequence[str] = ()) -> Done:
        return self.wait(self.start(*args, prefix=prefix), timeout)

    def running(self, handle: int) -> bool:
        return self._running[handle][1].poll() is None

    def output(self, handle: int) -> str:
        """What the process of ``handle`` has written to stdout so far."""
        return Path(f"{self._running[handle][2]}.out").read_text(encoding="utf-8")

    def kill(self, handle: int) -> None:
        """Kill (SIGKILL) the process of ``handle`` if it is still running."""
        _args, proc, _out = self._running[handle]
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def interrupt(self, handle: int) -> None:
        """Send SIGINT (Ctrl-C) to the process of ``handle``."""
        self._running[handle][1].send_signal(signal.SIGINT)

    def close(self) -> None:
        for handle in range(len(self._running)):
            self.kill(handle)


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    runner = Processes(tmp_path_factory.mktemp("deploy"))
    yield runner
    runner.close()


@dataclass(frozen=True)
class Deployment:
    server: Done
    clients: Sequence[Done]
    simulation: Done
    run: Path


CLIENTS = ("client-000", "client-001", "client-002")


@pytest.fixture(scope="module")
def deployment(procs: Processes) -> Deployment:
    """``fedloom partition digits --clients 3 --seed 5``, then 1 server and 3 clients on 127.0.0.1 for 2 rounds,
    and (alongside) the same federation under ``fedloom simulate --backend inline``."""
    simulation = procs.start(
        *("simulate", "digits", "--clients", "3", "--rounds", "2", "--seed", "5", "--backend", "inline"),
        *("--quiet", "--out", "sim-runs"),
    )
    procs.run("partition", "digits", "--clients", "3", "--seed", "5", "--out", "parts").ok()
    tokens = {name: procs.run("token", "create", name, "--run-dir", "net-run").ok().stdout.strip() for name in CLIENTS}
    address = f"127.0.0.1:{free_port()}"
    server = procs.start(
        *("server", "digits", "--address", address, "--rounds", "2", "--min-clients", "3", "--seed", "5"),
        *("--run-dir", "net-run", "--insecure", "--join-timeout", "60", "--round-timeout", "60"),
    )
    clients = [
        procs.start(
            *("client", "digits", "--server", address, "--data", f"parts/{name}.npz", "--token", tokens[name]),
            "--insecure",
        )
        for name in CLIENTS
    ]
    return Deployment(
        server=procs.wait(server),
        clients=[procs.wait(c) for c in clients],
        simulation=procs.wait(simulation),
        run=procs.cwd / "net-run",
    )


def test_deployment_gives_the_same_model_as_simulation(deployment: Deployment):
    server = deployment.server.ok()
    assert server.sha256() == deployment.simulation.ok().sha256()
    assert "clients connected: client-000, client-001, client-002" in server.stdout
    assert "without TLS" in server.stderr  # --insecure warns
    for done in deployment.clients:
        # Two rounds of fit and evaluate: four instructions each, then the server's bye ends the client.
        assert "answered 4 instructions" in done.ok().stdout


def test_the_deployed_run_is_in_the_run_store(deployment: Deployment, procs: Processes):
    run_dir = Path(procs.cwd / RUN_DIR_LINE.search(deployment.server.stdout).group(1))  # type: ignore[union-attr]
    assert run_dir == deployment.run
    shown = procs.run("runs", "show", run_dir).ok()
    assert str(run_dir) in shown.stdout
    store = RunStore(procs.cwd)
    rounds = store.rounds(str(run_dir))
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["num_ok"] == 3 for r in rounds)
    info = store.info(str(run_dir))
    assert info.status == "finished"
    assert info.params_sha256 == deployment.simulation.sha256()
    assert store.config(str(run_dir))["backend"] == "deployment"
    clients = store.client_metrics(str(run_dir))
    assert {c["client_id"] for c in clients} == set(CLIENTS)
    assert all(c["bytes_down"] > 0 and c["bytes_up"] > 0 for c in clients)
    events = store.client_events(str(run_dir))
    for name in CLIENTS:
        mine = [e for e in events if e["client_id"] == name]
        assert [e["event"] for e in mine][:1] == ["connected"]
        assert [e["event"] for e in mine if e["round"] == 1] == ["training", "reported", "evaluating", "reported"]
        sent = next(e for e in mine if e["event"] == "training")
        fit = next(c for c in clients if c["client_id"] == name and c["round"] == 1 and c["phase"] == "fit")
        assert sent["bytes"] == fit["bytes_down"]


class _Rounds:
    """A round observer that keeps the numbers of the rounds it saw."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_round(self, record: RoundRecord, params: Params) -> None:
        self.seen.append(record.server_round)


def test_a_deployment_served_from_python_gives_the_simulated_model_and_is_recorded(
    procs: Processes, one_torch_thread: None
):
    """``fedloom.serve`` in this process, over TLS made by the library's certificate helper, with one site that
    is a ``fedloom client`` process and one that is ``fedloom.connect`` in a thread of this process: the run it
    returns ends with the model of ``fedloom.simulate`` on the same job, seed and clients, and it is in the run
    store as it says."""
    sites = CLIENTS[:2]
    procs.run("partition", "digits", "--clients", "2", "--seed", "5", "--out", "api-parts").ok()
    init_certs(procs.cwd / "api-certs", ["127.0.0.1"], [])
    ca = procs.cwd / "api-certs" / "ca.pem"
    run_dir = procs.cwd / "api-run"
    tokens = TokenStore(run_dir)
    token = {name: tokens.create(name) for name in sites}
    address = f"127.0.0.1:{free_port()}"
    job = fedloom.load_job("digits")
    process = procs.start(
        *("client", "digits", "--server", address, "--data", f"api-parts/{sites[0]}.npz", "--token", token[sites[0]]),
        *("--ca", ca, "--retry-for", "60"),
    )
    answered: list[int] = []
    site = threading.Thread(
        target=lambda: answered.append(
            fedloom.connect(
                job,
                server=address,
                data=procs.cwd / "api-parts" / f"{sites[1]}.npz",
                token=token[sites[1]],
                tls=fedloom.ClientTLS(ca=ca),
                retry_for=60,
                state_dir=procs.cwd / "api-state",
            )
        ),
    )
    site.start()
    rounds = _Rounds()
    try:
        run = fedloom.serve(
            job,
            address=address,
            rounds=2,
            min_clients=2,
            run_dir=run_dir,
            tls=fedloom.ServerTLS(certs=procs.cwd / "api-certs"),
            seed=5,
            join_timeout=60,
            round_timeout=60,
            observers=[rounds],
        )
    finally:
        site.join(timeout=WAIT_S)
    assert not site.is_alive()
    assert answered == [4]  # two rounds of fit and evaluate, then the server's bye
    assert "answered 4 instructions" in procs.wait(process).ok().stdout
    simulation = dataclasses.replace(
        job.simulation, num_clients=2, rounds=2, seed=5, backend=fedloom.BackendConfig(name="inline")
    )
    simulated = fedloom.simulate(job, simulation=simulation, runs_dir=procs.cwd / "api-sim-runs")
    assert run.params_sha256 == simulated.params_sha256
    assert rounds.seen == [1, 2]
    assert [record.server_round for record in run.history] == [1, 2]
    assert (run.run_dir, run.backend) == (run_dir, "deployment")
    store = RunStore(procs.cwd)
    assert run.run_id in [info.run_id for info in store.list_runs()]
    info = store.info(str(run_dir))
    assert (info.run_id, info.status, info.params_sha256) == (run.run_id, "finished", run.params_sha256)
    assert [r["num_ok"] for r in store.rounds(str(run_dir))] == [2, 2]
    assert {e["client_id"] for e in store.client_events(str(run_dir))} == set(sites)


def test_serve_and_connect_refuse_settings_that_cannot_work_before_they_touch_anything(tmp_path: Path):
    with pytest.raises(fedloom.ConfigError) as missing:
        fedloom.ServerTLS()
    assert str(missing.value) == SERVER_TLS_MISSING
    with pytest.raises(fedloom.ConfigError, match="cannot be combined with --certs or --mutual-tls"):
        fedloom.ServerTLS(certs=tmp_path, insecure=True)
    with pytest.raises(fedloom.ConfigError) as missing:
        fedloom.ClientTLS(cert=tmp_path / "site.pem", key=tmp_path / "site.key")
    assert str(missing.value) == "--cert and --key need --ca or --ca-fingerprint, to check the server"
    with pytest.raises(fedloom.ConfigError) as missing:
        fedloom.ClientTLS()
    assert str(missing.value) == CLIENT_TLS_MISSING
    job = fedloom.load_job("digits")
    common = {
        "address": f"127.0.0.1:{free_port()}",
        "rounds": 1,
        "min_clients": 1,
        "tls": fedloom.ServerTLS(insecure=True),
    }
    with pytest.raises(fedloom.ConfigError, match="under its sites' Paillier key"):
        fedloom.serve(job, run_dir=tmp_path / "he", privacy=fedloom.PrivacySettings(paillier=True), **common)
    with pytest.raises(fedloom.ConfigError, match=r"^no client tokens in "):
        fedloom.serve(job, run_dir=tmp_path / "empty", **common)
    TokenStore(tmp_path / "dp").create("site")
    with pytest.raises(fedloom.ConfigError, match="--dp-clip needs --dp-noise Z"):
        fedloom.serve(
            job, run_dir=tmp_path / "dp", privacy=fedloom.PrivacySettings(fedloom.DPSettings(clip=0.5)), **common
        )
    assert not (tmp_path / "he").exists()
    assert [info.run_id for info in RunStore(tmp_path).list_runs()] == []  # nothing was recorded


SCAFFOLD_JOB = """
import dataclasses
import fedloom as fl
from fedloom.strategy import Scaffold
from fedloom.examples.digits import job as digits

job = dataclasses.replace(
    digits, name="scaffold-digits", strategy=Scaffold(fit=fl.FitConfig(local_epochs=1, batch_size=16, lr=0.1))
)
"""


def test_a_stateful_algorithm_deploys_with_the_state_on_each_sites_disk(procs: Processes):
    """SCAFFOLD over the network: each site keeps its control variate in its --state-dir, and the deployed
    run ends with the model of the inline simulation of the same job."""
    (procs.cwd / "scaffold_job.py").write_text(SCAFFOLD_JOB)
    common = ("--rounds", "2", "--seed", "5")
    simulation = procs.start("simulate", "scaffold_job.py", "--clients", "3", *common, "--backend", "inline", "-q")
    procs.run("partition", "digits", "--clients", "3", "--seed", "5", "--out", "scaffold-parts").ok()
    tokens = {n: procs.run("token", "create", n, "--run-dir", "scaffold-run").ok().stdout.strip() for n in CLIENTS}
    address = f"127.0.0.1:{free_port()}"
    server = procs.start(
        *("server", "scaffold_job.py", "--address", address, *common, "--min-clients", "3", "--insecure"),
        *("--run-dir", "scaffold-run", "--join-timeout", "60", "--round-timeout", "60"),
    )
    clients = [
        procs.start(
            *("client", "scaffold_job.py", "--server", address, "--data", f"scaffold-parts/{name}.npz"),
            *("--token", tokens[name], "--insecure", "--state-dir", f"state-{name}"),
        )
        for name in CLIENTS
    ]
    assert procs.wait(server).ok().sha256() == procs.wait(simulation).ok().sha256()
    for name, handle in zip(CLIENTS, clients, strict=True):
        procs.wait(handle).ok()
        control = load_params(procs.cwd / f"state-{name}" / "scaffold.control.safetensors")
        assert list(control) == ["0.weight", "0.bias", "2.weight", "2.bias"]
        assert any(np.abs(a).max() > 0 for a in control.values())


FEDBUFF_JOB = """
import dataclasses
import fedloom as fl
from fedloom.strategy import FedBuff
from fedloom.examples.digits import job as digits

job = dataclasses.replace(
    digits,
    name="fedbuff-digits",
    strategy=FedBuff(buffer_size=2, concurrency=3, fit=fl.FitConfig(local_epochs=1, batch_size=16, lr=0.1)),
)
"""


def test_fedbuff_deploys_and_does_not_wait_for_the_slow_site(procs: Processes):
    """FedBuff over the network, with one site holding 20 times the data of the others (so it trains 20 times
    as long): the server updates the model every 2 replies, the fast sites send more updates than the slow
    one, and the slow site's update arrives stale."""
    (procs.cwd / "fedbuff_job.py").write_text(FEDBUFF_JOB)
    procs.run("partition", "digits", "--clients", "3", "--seed", "5", "--out", "fedbuff-parts").ok()
    slow = load_client_data(procs.cwd / "fedbuff-parts" / "client-002.npz")
    bigger = ArrayData(np.tile(slow.train.x, (20, 1)), np.tile(slow.train.y, 20))
    save_client_data(procs.cwd / "fedbuff-parts" / "client-002.npz", ClientData(bigger, slow.test))
    tokens = {n: procs.run("token", "create", n, "--run-dir", "fedbuff-run").ok().stdout.strip() for n in CLIENTS}
    address = f"127.0.0.1:{free_port()}"
    server = procs.start(
        *("server", "fedbuff_job.py", "--address", address, "--rounds", "8", "--seed", "5", "--min-clients", "3"),
        *("--insecure", "--run-dir", "fedbuff-run", "--join-timeout", "60", "--round-timeout", "60"),
    )
    clients = [
        procs.start(
            *("client", "fedbuff_job.py", "--server", address, "--data", f"fedbuff-parts/{name}.npz"),
            *("--token", tokens[name], "--insecure"),
        )
        for name in CLIENTS
    ]
    procs.wait(server).ok()
    for handle in clients:
        procs.wait(handle).ok()
    store = RunStore(procs.cwd)
    rounds = store.rounds("fedbuff-run")
    assert [r["round"] for r in rounds] == list(range(1, 9))
    assert max(r["staleness_max"] for r in rounds) >= 1
    accuracy = [r["federated_accuracy"] for r in rounds if r["federated_accuracy"] is not None]  # idle sites
    assert len(accuracy) >= 2
    assert accuracy[-1] > accuracy[0]
    updates = dict.fromkeys(CLIENTS, 0.0)
    for record in store.client_metrics("fedbuff-run"):
        if record["phase"] == "fit" and record["status"] == "ok":
            updates[record["client_id"]] += record["metrics"]["updates"]
    assert sum(updates.values()) == 8 * 2
    assert updates["client-002"] < min(updates["client-000"], updates["client-001"])


def test_user_mistakes_are_one_line_errors(procs: Processes):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    nobody = free_port()
    one = ClientData(
        ArrayData(np.zeros((2, 64), np.float32), np.array([0, 1])), ArrayData(np.zeros((0, 64)), np.zeros(0))
    )
    save_client_data(procs.cwd / "one.npz", one)
    procs.run("token", "create", "a", "--run-dir", "mistakes-run").ok()  # so that the servers get as far as the address
    try:
        started = time.monotonic()
        handles = {
            "no_tls": procs.start(
                *("server", "digits", "--address", "127.0.0.1:1", "--rounds", "1", "--min-clients", "1"),
                *("--run-dir", "no-tls"),
            ),
            "no_tokens": procs.start(
                *("server", "digits", "--address", f"127.0.0.1:{nobody}", "--rounds", "1", "--min-clients", "1"),
                *("--run-dir", "empty-run", "--insecure"),
            ),
            "client_no_tls": procs.start(
                "client", "digits", "--server", "127.0.0.1:1", "--data", "one.npz", "--token", "flt_x"
            ),
            "port_in_use": procs.start(
                *("server", "digits", "--address", f"127.0.0.1:{busy_port}", "--rounds", "1"),
                *("--min-clients", "1", "--insecure", "--run-dir", "mistakes-run"),
            ),
            "bad_address": procs.start(
                *("server", "digits", "--address", "localhost", "--rounds", "1", "--min-clients", "1", "--insecure"),
                *("--run-dir", "mistakes-run"),
            ),
            "unreachable": procs.start(
                *("client", "digits", "--server", f"127.0.0.1:{nobody}", "--data", "one.npz", "--token", "flt_x"),
                *("--insecure", "--retry-for", "2"),
            ),
            "no_data": procs.start(
                *("client", "digits", "--server", f"127.0.0.1:{nobody}", "--data", "missing.npz", "--token", "flt_x"),
                "--insecure",
            ),
        }
        done = {name: procs.wait(handle, timeout=60) for name, handle in handles.items()}
    finally:
        busy.close()
    assert done["no_tls"].error() == SERVER_TLS_MISSING
    assert done["no_tokens"].error().startswith("no client tokens in empty-run: make one per site with")
    assert done["client_no_tls"].error() == CLIENT_TLS_MISSING
    assert "cannot listen on 127.0.0.1:" in done["port_in_use"].error()
    assert "is not HOST:PORT" in done["bad_address"].error()
    assert "missing.npz does not exist" in done["no_data"].error()
    unreachable = done["unreachable"]
    assert unreachable.error().startswith(f"cannot reach the server at 127.0.0.1:{nobody}: tried for ")
    assert "(--retry-for 2); last error: " in unreachable.error()
    assert time.monotonic() - started < 120  # bounded: every client gives up by itself, even on a loaded machine


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail the test if it does not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class _RawClient:
    """A client on a bare fleet stream, in this process: it offers every instruction back as its reply and sends
    it when granted (``delay`` seconds late, if asked to), or stays silent; with ``unasked``, it sends the reply
    without offering it. It takes messages of up to ``limit`` bytes. It answers the server's pings unless
    ``pongs`` is off, and declares ``examples`` in its hello."""

    def __init__(
        self,
        address: str,
        name: str,
        *,
        echo: bool,
        unasked: bool = False,
        delay: float = 0.0,
        limit: int = 1 << 20,
        pongs: bool = True,
        examples: int = 0,
    ) -> None:
        self._outbox: queue.Queue[fleet_pb2.ClientFrame | Chunk | None] = queue.Queue()
        hello = fleet_pb2.Hello(protocol_version=PROTOCOL_VERSION, token=name, train_examples=examples)
        self._outbox.put(fleet_pb2.ClientFrame(hello=hello))
        self._pongs = pongs
        self.welcomed = threading.Event()
        self.pings = 0
        # A connection of its own, as a client in another process has (gRPC would share one between the
        # channels of a process that dial the same address).
        options = [("grpc.enable_http_proxy", 0), ("grpc.use_local_subchannel_pool", 1)]
        self._channel = grpc.insecure_channel(address, options=options)
        self._frames = connect_call(self._channel)(iter(self._outbox.get, None))
        self._echo = echo
        self._unasked = unasked
        self._delay = delay
        self._limit = limit
        self.refusals: list[str] = []
        self.declines: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        reassembler = Reassembler(self._limit)
        offered: dict[int, bytes] = {}
        try:
            for frame in self._frames:
                if isinstance(frame, Chunk):
                    done = reassembler.feed(frame)
                    if done is None or not self._echo:
                        continue
                    message_id, data = done[0], bytes(done[1])
                    if self._unasked:
                        self._send(message_id, data)
                    else:
                        offered[message_id] = data
                        offer = fleet_pb2.ClientFrame(offer=fleet_pb2.Offer(message_id=message_id, size=len(data)))
                        threading.Timer(self._delay, self._outbox.put, (offer,)).start()
                    continue
                kind = frame.WhichOneof("frame")
                if kind == "welcome":
                    self.welcomed.set()
                elif kind == "ping":
                    self.pings += 1
                    if self._pongs:
                        self._outbox.put(fleet_pb2.ClientFrame(pong=fleet_pb2.Pong(nonce=frame.ping.nonce)))
                elif kind == "refusal":
                    self.refusals.append(frame.refusal.reason)
                elif kind == "decline":
                    self.declines.append(frame.decline.reason)
                elif kind == "grant":
                    self._send(frame.grant.message_id, offered.pop(frame.grant.message_id))
        except grpc.RpcError:
            pass

    def _send(self, message_id: int, data: bytes) -> None:
        for chunk in split_message(message_id, data, chunk_size=5):
            self._outbox.put(chunk)

    def close(self) -> None:
        self._outbox.put(None)
        self._frames.cancel()
        self._channel.close()
        self._thread.join(timeout=10)


class _FreezingProxy:
    """Forwards TCP from 127.0.0.1:``port`` to the server until :meth:`freeze`: from then on it forwards nothing
    either way and keeps every connection open, as a network that goes dark does (it does not close)."""

    def __init__(self, target: int) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._frozen = threading.Event()
        self._stopped = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                inbound, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            outbound = socket.create_connection(("127.0.0.1", self._target))
            self._sockets += [inbound, outbound]
            for source, sink in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(0.1)
        while not self._stopped.is_set():
            if self._frozen.is_set():
                time.sleep(0.1)
                continue
            try:
                data = source.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            try:
                sink.sendall(data)
            except OSError:
                return

    def freeze(self) -> None:
        self._frozen.set()

    def close(self) -> None:
        self._stopped.set()
        for sock in [self._listener, *self._sockets]:
            sock.close()


def test_a_client_behind_a_network_gone_dark_is_dropped_by_heartbeats_not_the_deadline(caplog):
    port = free_port()
    with FleetServer(f"127.0.0.1:{port}", heartbeat=1.0, authenticate=lambda token: token) as server:
        proxy = _FreezingProxy(port)
        client = _RawClient(f"127.0.0.1:{proxy.port}", "dark", echo=False)  # it trains for ever, silently
        try:
            server.wait_for_clients(1, timeout=30)
            message = Message("fit", Params({"w": np.zeros(10, np.float32)}), {"round": 1})
            threading.Timer(1.0, proxy.freeze).start()  # once the instruction is through
            started = time.monotonic()
            exchange = server.grid.send_and_receive({"dark": message}, timeout=120.0)
            assert exchange.dropped == ("dark",)
            assert time.monotonic() - started < 30  # a heartbeat went unanswered: gone, long before the deadline
            assert "client dark did not reply to its fit instruction (disconnected)" in caplog.text
            assert list(server.grid.client_ids()) == []
        finally:
            client.close()
            proxy.close()


_FROZEN_CLIENT = """
import sys, time
sys.path.insert(0, {here!r})
import test_deployment
test_deployment._RawClient({address!r}, "frozen", echo=True, limit=1 << 30)
time.sleep(300)
"""


def test_a_client_whose_machine_freezes_while_it_receives_the_model_is_dropped_by_heartbeats(caplog):
    port = free_port()
    with FleetServer(f"127.0.0.1:{port}", heartbeat=1.0, authenticate=lambda token: token) as server:
        program = _FROZEN_CLIENT.format(here=str(Path(__file__).parent), address=f"127.0.0.1:{port}")
        child = subprocess.Popen([sys.executable, "-c", program], env={**os.environ, "no_proxy": "127.0.0.1"})
        try:
            server.wait_for_clients(1, timeout=60)
            model = Message("fit", Params({"w": np.zeros(50_000_000, np.float32)}), {"round": 1})  # 200 MB
            threading.Timer(0.3, child.send_signal, (signal.SIGSTOP,)).start()  # frozen mid-download
            started = time.monotonic()
            exchange = server.grid.send_and_receive({"frozen": model}, timeout=120.0)
            assert exchange.dropped == ("frozen",)
            assert time.monotonic() - started < 30  # not the 120 s deadline
            assert "client frozen did not reply to its fit instruction (disconnected)" in caplog.text
        finally:
            child.kill()
            child.wait(timeout=10)


def test_the_net_grid_drops_silent_and_vanished_clients_and_keeps_the_order_of_messages():
    address = f"127.0.0.1:{free_port()}"
    with FleetServer(address, chunk_size=16, authenticate=lambda token: token) as server:
        clients = {name: _RawClient(address, name, echo=name != "b") for name in ("c", "a", "b", "d")}
        try:
            assert server.wait_for_clients(4, timeout=30) == ["a", "b", "c", "d"]
            assert list(server.grid.client_ids()) == ["a", "b", "c", "d"]
            clients["d"].close()  # vanishes: dropped as soon as the server notices, not at the deadline
            messages = {
                name: Message("evaluate", Params({"w": np.full(3, i, np.float32)}), {"round": 1})
                for i, name in enumerate(("c", "b", "a", "d", "nobody"))
            }
            started = time.monotonic()
            exchange = server.grid.send_and_receive(messages, timeout=2.0)
            assert time.monotonic() - started < 10
            assert list(exchange.replies) == ["c", "a"]
            assert set(exchange.dropped) == {"b", "d", "nobody"}
            for name, reply in exchange.replies.items():
                assert reply.message.params.sha256() == messages[name].params.sha256()
                assert reply.bytes_down == reply.bytes_up == len(encode_message(messages[name]))
                assert reply.seconds > 0
        finally:
            for client in clients.values():
                client.close()


def test_a_reply_over_the_size_limit_is_declined_with_a_reason_and_the_others_are_served(caplog):
    address = f"127.0.0.1:{free_port()}"
    with FleetServer(address, max_message_bytes=2000, authenticate=lambda token: token) as server:
        clients = {name: _RawClient(address, name, echo=True) for name in ("big", "small")}
        try:
            server.wait_for_clients(2, timeout=30)
            messages = {
                "big": Message("evaluate", Params({"w": np.zeros(1000, np.float32)}), {"round": 1}),
                "small": Message("evaluate", Params({"w": np.zeros(10, np.float32)}), {"round": 1}),
            }
            started = time.monotonic()
            exchange = server.grid.send_and_receive(messages, timeout=60.0)
            assert time.monotonic() - started < 30  # the round does not wait for the refused reply's deadline
            assert list(exchange.replies) == ["small"]
            assert exchange.dropped == ("big",)
            wait_until(lambda: clients["big"].declines, 10, "the client's decline")
            assert len(clients["big"].declines) == 1
            assert re.fullmatch(r"reply \d+ is \d+ bytes, over the limit of 2000 bytes", clients["big"].declines[0])
            # Logged once, by the round that awaited it (not again when it was declined).
            assert len(re.findall(r"over the limit of 2000 bytes", caplog.text)) == 1
            assert re.search(r"client big: its reply was refused: reply \d+ is \d+ bytes, over the", caplog.text)
            assert list(server.grid.client_ids()) == ["big", "small"]  # declined, not disconnected
            events = [(e.client_id, e.event) for e in server.take_events()]
            assert ("big", "refused") in events
            assert ("small", "reported") in events
        finally:
            for client in clients.values():
                client.close()


def test_a_late_reply_is_declined_before_its_bytes_are_sent_and_logged(caplog):
    address = f"127.0.0.1:{free_port()}"
    with FleetServer(address, authenticate=lambda token: token) as server:
        client = _RawClient(address, "slow", echo=True, delay=2.0)
        try:
            server.wait_for_clients(1, timeout=30)
            message = Message("evaluate", Params({"w": np.zeros(10, np.float32)}), {"round": 1})
            exchange = server.grid.send_and_receive({"slow": message}, timeout=0.5)
            assert exchange.dropped == ("slow",)
            assert "client slow did not reply to its evaluate instruction (no reply by the deadline)" in caplog.text
            wait_until(lambda: client.declines, 20, "the client's decline")
            assert client.declines == ["it came after its round's deadline"]
            assert re.search(r"client slow: declined its reply \d+: it came after its round's deadline", caplog.text)
            late = [e for e in server.take_events() if e.event == "late"]
            assert len(late) == 1
            assert late[0].nbytes == len(encode_message(message))
            assert late[0].server_round == 1
            assert list(server.grid.client_ids()) == ["slow"]  # still connected, for the next round
        finally:
            client.close()


def test_a_reply_sent_without_a_grant_ends_that_session_and_the_others_are_served(caplog):
    address = f"127.0.0.1:{free_port()}"
    with FleetServer(address, authenticate=lambda token: token) as server:
        clients = {
            "pushy": _RawClient(address, "pushy", echo=True, unasked=True),
            "polite": _RawClient(address, "polite", echo=True),
        }
        try:
            server.wait_for_clients(2, timeout=30)
            message = Message("evaluate", Params({"w": np.zeros(10, np.float32)}), {"round": 1})
            exchange = server.grid.send_and_receive({"pushy": message, "polite": message}, timeout=60.0)
            assert list(exchange.replies) == ["polite"]
            assert exchange.dropped == ("pushy",)
            wait_until(lambda: clients["pushy"].refusals, 10, "the client's refusal")
            assert len(clients["pushy"].refusals) == 1
            assert re.fullmatch(
                r"a chunk of message \d+, which the server did not ask for", clients["pushy"].refusals[0]
            )
            assert "client pushy: refused its frame and disconnected it: a chunk of message" in caplog.text
            assert list(server.grid.client_ids()) == ["polite"]
        finally:
            for client in clients.values():
                client.close()
