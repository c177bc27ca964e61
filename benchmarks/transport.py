"""Deployment transport: a FedAvg round of large updates over loopback TLS, against plain loopback sockets.

    python benchmarks/transport.py                       # 10 and 50 clients of 100 MB, then one 1 GiB client
    python benchmarks/transport.py --clients 10 --skip-gib --rounds 3
    python benchmarks/transport.py --quick               # 4 and 8 clients of 4 MB, 64 MiB: a smoke run, 1 min
    python benchmarks/transport.py --json out.json       # also write every case's numbers

What is measured, every case in the same run on the same machine:

- **fleet**: ``FleetServer`` with FedAvg (``run_rounds``, every client every round, ``fraction_evaluate=0`` so
  only the fit exchange happens) and N ``run_client`` agents over 127.0.0.1, with TLS (a CA and server
  certificate from ``fedloom.runtime.net.tls.init_certs``) or plaintext. The model is one float32 array of
  ``--mb`` MB (10^6 bytes; 100 MB = 25,000,000 values), so each round moves the model DOWN to every client
  and each client's update UP: 2 * N * 100 MB. The client task does no training: it returns the ``Params``
  it received, uncopied, as its ``FitResult`` (``num_examples=1``), so the clients hold no second model and
  the round measures transport; the aggregate must then equal the global model exactly (checked).
- **raw**: the same bytes moved the same way with plain TCP sockets, no TLS, no framing: N connections, the
  server sends ``--mb`` MB down each one (one thread per connection, all at once), each client receives the
  whole message and sends it back, the server receives it (checked equal to what it sent), in the same
  client processes and threads as the fleet's. This is the reference, ratio = fleet seconds / raw seconds,
  and a strict one: it times the transfer alone, each receiver landing the bytes in a buffer allocated (and
  its pages touched) before the clock starts, whereas the fleet's receivers allocate memory for each message
  as it comes (reassembly buffer, decoded arrays, the aggregate's temporaries), inside the timed round.
- **1 GiB**: one client, a 2**30-byte model (one float32 array), TLS; the client returns its params plus 1.0
  (a new array, so the update is the client's own), and the final model is checked to equal the initial one
  plus 1.0 per round, exactly; with the raw reference for the same bytes.

Each case runs in a fresh server process (this script with ``--role case``), so that one case's heap cannot
hide another's peak, and its clients in further processes (``--role clients``): at most ``--max-processes``
of them (default 10), the clients spread evenly over them as threads (at 50 clients: 10 processes of 5).
Every client has its own TCP connection: gRPC would put the plaintext channels of one process on one shared
connection (its global subchannel pool), so each client thread gets a keepalive period 1 ms apart from the
others' (distinct channel arguments); the server's ``connected`` events are checked to come from N distinct
ports. Clients connect, and the server waits for all of them, before anything is timed.

Per case it prints: **transfer s**, the wall time of the fit exchange (``grid.send_and_receive``: from
sending the instructions to the last update folded into the aggregate; for raw, from the first byte sent to
the last byte received), the best of ``--rounds`` rounds; **round s**, the whole round of ``run_rounds``
(adds choosing clients and finishing the mean); **GB/s**, the bytes moved both ways over the transfer time;
**1st up s**, when the first update had been folded (raw: the first upload complete; the downloads are
mostly over by then); the ratio to raw with the same N and size; **CPU s/round**, the server process's (all
its threads) and the clients' (all client processes, from after their imports to bye), over the rounds
run; **peak RSS**: the
server process's RSS sampled every 5 ms during the rounds, minus its RSS just before them (the global model
and imports are in that baseline), and ``ru_maxrss``, its lifetime high-water mark (exact, setup included);
whether the result arrived intact; and the 1-minute load average before and after the case (other work on
the machine slows every case, the fleet's most). With FedAvg the server folds each update into a float64 running mean
as it arrives and at most ``max_uploads`` (``--uploads``) replies are read at once, so the peak should not
grow with N; for contrast the summary states what holding every update would take (N * 100 MB), and a
PASS/FAIL line says whether the peak stayed flat from the smallest to the largest N (within 1.25x). Then a
PASS/FAIL line for the target: the fleet TLS round within 1.5x of the raw round at 10 clients of 100 MB.

The machine's cores are shared by the server and all client processes, so on a small machine the fleet's
CPU cost (TLS, protobuf framing, copies, page faults on new memory) shows up directly in its wall time; the
CPU columns say how much.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

MB = 10**6
GIB = 2**30
TARGET = 1.5
CONNECT_S = 120.0  # the longest the server waits for its clients to connect
ROUND_TIMEOUT_S = 900.0
RSS_INTERVAL_S = 0.005
HEARTBEAT_S = 30.0
LOOPBACK = "127.0.0.1"
GRPC_METHOD = "/transport.Bench/Echo"
PROXY_ENV = {"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}  # gRPC obeys proxy variables


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def model_values(nbytes: int) -> np.ndarray:
    """``nbytes`` of float32 values in [0, 1), the same every time (a repeating ramp, so no two neighbours
    are equal and a misplaced chunk changes the result)."""
    if nbytes % 4:
        raise SystemExit(f"the model size must be a multiple of 4 bytes, got {nbytes}")
    ramp = np.arange(4093, dtype=np.float32) / np.float32(4093)
    return np.resize(ramp, nbytes // 4)


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


class PeakRss:
    """Samples this process's RSS every ``interval`` seconds in a thread while in the ``with`` block."""

    def __init__(self, interval: float = RSS_INTERVAL_S) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self._process = psutil.Process()
        self.baseline = 0
        self.peak = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakRss:
        self.baseline = self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


# -- client processes ---------------------------------------------------------------------------------------


class EchoTask:
    """A client that does no training: its update is the params it was sent (not copied), or those plus
    ``add`` (a new array), from one example. The benchmark measures transport, not training."""

    def __init__(self, add: float) -> None:
        self.add = add

    def init_params(self, seed: int) -> Any:
        from fedloom.core.params import Params

        return Params({})

    def fit(self, params: Any, data: Any, config: Any) -> Any:
        from fedloom.core.params import Params
        from fedloom.core.results import FitResult

        if self.add:
            params = Params({name: array + np.float32(self.add) for name, array in params.items()})
        return FitResult(params, num_examples=1)

    def evaluate(self, params: Any, data: Any) -> Any:
        from fedloom.core.results import EvalResult

        return EvalResult(0.0, 0)


def fleet_client(spec: Mapping[str, Any], index: int, name: str, answered: dict[str, int]) -> None:
    from fedloom.data.base import ArrayData, ClientData
    from fedloom.runtime.client import client_app
    from fedloom.runtime.net.client import run_client
    from fedloom.runtime.net.tls import channel_credentials

    one = ArrayData(np.zeros((1, 1), np.float32), np.zeros(1, np.int64))
    credentials = channel_credentials(Path(spec["certs"]) / "ca.pem") if spec["tls"] else None
    answered[name] = run_client(
        client_app(EchoTask(spec["add"]), deployed=True),
        ClientData(one, one),
        server=spec["address"],
        token=f"token-{name}",
        retry_for=60.0,
        heartbeat=HEARTBEAT_S + index / 1000,  # distinct channel args: a connection of its own (see the doc)
        chunk_size=spec["chunk"],
        credentials=credentials,
    )


def recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from ``sock``; ``False`` if the peer closed before sending anything."""
    at = 0
    while at < len(view):
        got = sock.recv_into(view[at:])
        if not got:
            if at == 0:
                return False
            raise ConnectionError(f"peer closed after {at} of {len(view)} bytes")
        at += got
    return True


def raw_client(spec: Mapping[str, Any], index: int, name: str, answered: dict[str, int]) -> None:
    """Receive a whole message into a buffer made beforehand, send it back; until the server closes the
    connection. Over TLS (Python's ``ssl``, OpenSSL) for a TLS case."""
    buffer = memoryview(bytearray(spec["nbytes"]))  # zero-filled: its pages are touched before any transfer
    count = 0
    with socket.create_connection((LOOPBACK, spec["port"])) as plain:
        sock = plain
        if spec["tls"]:
            context = ssl.create_default_context(cafile=str(Path(spec["certs"]) / "ca.pem"))
            sock = context.wrap_socket(plain, server_hostname=LOOPBACK)
        while recv_exactly(sock, buffer):
            sock.sendall(buffer)
            count += 1
    answered[name] = count


def grpc_client(spec: Mapping[str, Any], index: int, name: str, answered: dict[str, int]) -> None:
    """On one bare gRPC stream (bytes in, bytes out: no protobuf, no fedloom): receive the server's chunks until
    a whole message is in, send the same chunk objects back; until the server ends the stream."""
    import grpc

    options = [("grpc.max_receive_message_length", 8 << 20), ("grpc.keepalive_time_ms", 300_000 + index)]
    if spec["tls"]:
        credentials = grpc.ssl_channel_credentials((Path(spec["certs"]) / "ca.pem").read_bytes())
        channel = grpc.secure_channel(spec["address"], credentials, options=options)
    else:
        channel = grpc.insecure_channel(spec["address"], options=options)
    outbox: queue.Queue[bytes | None] = queue.Queue()
    call = channel.stream_stream(GRPC_METHOD, request_serializer=_same, response_deserializer=_same)
    count, got, chunks = 0, 0, []
    for chunk in call(iter(outbox.get, None)):
        chunks.append(chunk)
        got += len(chunk)
        if got == spec["nbytes"]:
            for piece in chunks:
                outbox.put(piece)
            count, got, chunks = count + 1, 0, []
    outbox.put(None)
    channel.close()
    answered[name] = count


def _same(data: bytes) -> bytes:
    return data


def clients_role(spec: Mapping[str, Any]) -> None:
    """Run this process's clients, one thread each; print a JSON line of what they did (CPU seconds from
    after the imports to the end)."""
    if spec["mode"] == "fleet":
        import fedloom.runtime.net.client
        import fedloom.runtime.net.tls  # noqa: F401
    started_cpu = time.process_time()
    run = {"fleet": fleet_client, "raw": raw_client, "grpc": grpc_client}[spec["mode"]]
    answered: dict[str, int] = {}
    threads = [
        threading.Thread(target=run, args=(spec, index, name, answered), name=name)
        for index, name in zip(spec["indices"], spec["names"], strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(
        json.dumps({"answered": answered, "cpu_s": time.process_time() - started_cpu, "max_rss_mib": max_rss_mib()}),
        flush=True,
    )


class ClientProcesses:
    """The case's client processes: started with their share of the names, output to files, killed at exit
    if still running."""

    def __init__(self, spec: Mapping[str, Any], names: Sequence[str], folder: Path) -> None:
        count = max(1, min(spec["max_processes"], len(names)))
        env = {**os.environ, **PROXY_ENV}
        self._procs: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
        for p in range(count):
            share = list(range(p, len(names), count))
            mine = {**spec, "names": [names[i] for i in share], "indices": share}
            out, err = folder / f"clients-{p}.out", folder / f"clients-{p}.err"
            with open(out, "wb") as stdout, open(err, "wb") as stderr:
                proc = subprocess.Popen(
                    [sys.executable, __file__, "--role", "clients", "--spec", json.dumps(mine)],
                    env=env,
                    stdout=stdout,
                    stderr=stderr,
                )
            self._procs.append((proc, out, err))

    def check_alive(self) -> None:
        for proc, _out, err in self._procs:
            if proc.poll() is not None:
                raise SystemExit(f"a client process exited early ({proc.returncode}):\n{err.read_text()[-4000:]}")

    def finish(self, timeout: float = 120.0) -> dict[str, Any]:
        """Wait for every client process; their summed CPU seconds, largest peak RSS and answers."""
        cpu, peak, answered = 0.0, 0.0, {}
        for proc, out, err in self._procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise SystemExit(f"a client process did not finish:\n{err.read_text()[-4000:]}") from None
            lines = out.read_text().strip().splitlines()
            if proc.returncode != 0 or not lines:
                raise SystemExit(f"a client process failed ({proc.returncode}):\n{err.read_text()[-4000:]}")
            done = json.loads(lines[-1])
            cpu += done["cpu_s"]
            peak = max(peak, done["max_rss_mib"])
            answered.update(done["answered"])
        return {"clients_cpu_s": cpu, "client_process_max_rss_mib": peak, "answered": answered}

    def kill(self) -> None:
        for proc, _out, _err in self._procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# -- the server side of a case ------------------------------------------------------------------------------


class TimedGrid:
    """The grid, with the wall time of each non-empty exchange and the times at which updates were folded."""

    def __init__(self, grid: Any) -> None:
        self._grid = grid
        self.seconds: list[float] = []
        self.first_fold: list[float] = []

    def client_ids(self) -> Sequence[str]:
        return self._grid.client_ids()  # type: ignore[no-any-return]

    def send_and_receive(self, messages: Mapping[str, Any], timeout: float | None = None, on_reply: Any = None) -> Any:
        if not messages:  # the evaluate phase, turned off
            return self._grid.send_and_receive(messages, timeout, on_reply)
        folded: list[float] = []

        def timed(client_id: str, reply: Any) -> Any:
            kept = on_reply(client_id, reply) if on_reply is not None else reply
            folded.append(time.perf_counter())
            return kept

        started = time.perf_counter()
        exchange = self._grid.send_and_receive(messages, timeout, timed)
        self.seconds.append(time.perf_counter() - started)
        self.first_fold.append(min(folded) - started if folded else float("nan"))
        return exchange


def equal_blockwise(got: np.ndarray, initial: np.ndarray, add: float, rounds: int, block: int = 1 << 24) -> bool:
    """Whether ``got`` is ``initial`` with ``add`` added ``rounds`` times in float32, as the clients add it each
    round (the mean of one or of equal updates is exact); a block at a time, so a 1 GiB model needs no copy."""
    if got.shape != initial.shape or got.dtype != initial.dtype:
        return False
    flat_got, flat_initial = got.reshape(-1), initial.reshape(-1)
    for start in range(0, flat_got.size, block):
        expected = flat_initial[start : start + block]
        for _ in range(rounds if add else 0):
            expected = expected + np.float32(add)
        if not np.array_equal(flat_got[start : start + block], expected):
            return False
    return True


def fleet_case(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    from fedloom.core.params import Params
    from fedloom.runtime.loop import run_rounds
    from fedloom.runtime.net.server import FleetServer
    from fedloom.runtime.net.tls import server_credentials
    from fedloom.strategy import FedAvg

    n = spec["clients"]
    names = [f"c{k:03d}" for k in range(n)]
    tokens = {f"token-{name}": name for name in names}
    initial = Params({"w": model_values(spec["nbytes"])})  # the ramp is a temporary; Params keeps a copy
    port = free_port()
    spec = {**spec, "address": f"{LOOPBACK}:{port}"}
    credentials = server_credentials(spec["certs"]) if spec["tls"] else None
    with FleetServer(
        spec["address"],
        authenticate=tokens.get,
        chunk_size=spec["chunk"],
        max_message_bytes=max(4 << 30, 2 * spec["nbytes"]),
        max_clients=n + 4,
        max_uploads=spec["uploads"],
        heartbeat=HEARTBEAT_S,
        credentials=credentials,
    ) as server:
        clients = ClientProcesses(spec, names, folder)
        try:
            deadline = time.monotonic() + CONNECT_S
            while len(server.grid.client_ids()) < n and time.monotonic() < deadline:
                clients.check_alive()
                time.sleep(0.1)
            server.wait_for_clients(n, 1.0)
            time.sleep(0.2)  # let the last "connected" event land
            peers = {e.detail for e in server.take_events() if e.event == "connected"}
            grid = TimedGrid(server.grid)
            strategy = FedAvg(fraction=1.0, min_clients=n, fraction_evaluate=0.0)
            cpu = time.process_time()
            with PeakRss() as rss:
                result = run_rounds(
                    strategy=strategy,
                    grid=grid,
                    initial_params=initial,
                    rounds=spec["rounds"],
                    seed=0,
                    timeout=ROUND_TIMEOUT_S,
                )
            cpu = time.process_time() - cpu
            round_seconds = [r.seconds for r in result.history]
            dropped = [c.client_id for r in result.history for c in r.clients if c.status != "ok"]
            intact = not dropped and equal_blockwise(result.params["w"], initial["w"], spec["add"], spec["rounds"])
            del result
            server.say_bye()
            finished = clients.finish()
        finally:
            clients.kill()
    return {
        "transfer_s": grid.seconds,
        "round_s": round_seconds,
        "first_up_s": grid.first_fold,
        "server_cpu_s": cpu,
        "rss_baseline_mib": rss.baseline / 2**20,
        "rss_peak_mib": rss.peak / 2**20,
        "max_rss_mib": max_rss_mib(),
        "distinct_connections": len(peers),
        "dropped": dropped,
        "intact": intact and len(peers) == n and all(v == spec["rounds"] for v in finished["answered"].values()),
        **finished,
    }


def reference_result(
    seconds: list[float],
    first_up: list[float],
    cpu: float,
    rss: PeakRss,
    connections: int,
    intact: bool,
    finished: dict[str, Any],
    rounds: int,
) -> dict[str, Any]:
    """A reference case's numbers, in the fleet case's keys."""
    return {
        "transfer_s": seconds,
        "round_s": None,
        "first_up_s": first_up,
        "server_cpu_s": cpu,
        "rss_baseline_mib": rss.baseline / 2**20,
        "rss_peak_mib": rss.peak / 2**20,
        "max_rss_mib": max_rss_mib(),
        "distinct_connections": connections,
        "dropped": [],
        "intact": intact and all(v == rounds for v in finished["answered"].values()),
        **finished,
    }


def raw_case(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    n, nbytes = spec["clients"], spec["nbytes"]
    payload = memoryview(model_values(nbytes)).cast("B")
    with socket.create_server((LOOPBACK, 0), backlog=n + 8) as listener:
        spec = {**spec, "port": listener.getsockname()[1]}
        clients = ClientProcesses(spec, [f"c{k:03d}" for k in range(n)], folder)
        connections: list[socket.socket] = []
        try:
            listener.settimeout(CONNECT_S)
            context = None
            if spec["tls"]:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(Path(spec["certs"]) / "server.pem", Path(spec["certs"]) / "server.key")
            while len(connections) < n:
                accepted = listener.accept()[0]
                connections.append(accepted if context is None else context.wrap_socket(accepted, server_side=True))
            buffers = [memoryview(bytearray(nbytes)) for _ in range(n)]  # zero-filled: pages touched now
            seconds, first_up = [], []
            cpu = time.process_time()
            with PeakRss() as rss:
                for _ in range(spec["rounds"]):
                    done: list[float] = []

                    def exchange(sock: socket.socket, buffer: memoryview, done: list[float] = done) -> None:
                        sock.sendall(payload)
                        if not recv_exactly(sock, buffer):
                            raise ConnectionError("a raw client closed its connection")
                        done.append(time.perf_counter())

                    threads = [
                        threading.Thread(target=exchange, args=(sock, buf))
                        for sock, buf in zip(connections, buffers, strict=True)
                    ]
                    started = time.perf_counter()
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                    seconds.append(time.perf_counter() - started)
                    first_up.append(min(done) - started if len(done) == n else float("nan"))
            cpu = time.process_time() - cpu
            sent = np.frombuffer(payload, np.uint8)
            intact = all(np.array_equal(np.frombuffer(buffer, np.uint8), sent) for buffer in buffers)
        finally:
            for sock in connections:
                sock.close()
        try:
            finished = clients.finish()
        finally:
            clients.kill()
    return reference_result(seconds, first_up, cpu, rss, len(connections), intact, finished, spec["rounds"])


def grpc_case(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The floor of any transport on grpcio: N bare bidirectional streams moving the model in chunks of the
    fleet's size as ``bytes`` (no protobuf, no fedloom), down and back, the server landing each upload in a
    buffer allocated before the clock starts, as the raw case does."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    n, nbytes, size = spec["clients"], spec["nbytes"], spec["chunk"]
    payload = memoryview(model_values(nbytes)).cast("B")
    chunks = [bytes(payload[at : at + size]) for at in range(0, nbytes, size)]  # made once, before any round
    buffers = [memoryview(bytearray(nbytes)) for _ in range(n)]  # zero-filled: pages touched now
    go = [threading.Semaphore(0) for _ in range(n)]
    done: list[float] = []
    finished = threading.Semaphore(0)
    connected = [0]  # streams opened so far; the k-th gets buffers[k]
    lock = threading.Lock()

    def serve(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        with lock:
            k = connected[0]
            connected[0] += 1
        buffer = buffers[k]
        for _ in range(spec["rounds"]):
            go[k].acquire()
            yield from chunks
            at = 0
            while at < nbytes:
                piece = next(requests)
                buffer[at : at + len(piece)] = piece
                at += len(piece)
            with lock:
                done.append(time.perf_counter())
            finished.release()

    handler = grpc.method_handlers_generic_handler(
        GRPC_METHOD.split("/")[1],
        {GRPC_METHOD.split("/")[2]: grpc.stream_stream_rpc_method_handler(serve, _same, _same)},
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=n + 4), options=[("grpc.max_receive_message_length", 8 << 20)])
    server.add_generic_rpc_handlers([handler])
    if spec["tls"]:
        certs = Path(spec["certs"])
        key_pair = ((certs / "server.key").read_bytes(), (certs / "server.pem").read_bytes())
        port = server.add_secure_port(f"{LOOPBACK}:0", grpc.ssl_server_credentials([key_pair]))
    else:
        port = server.add_insecure_port(f"{LOOPBACK}:0")
    server.start()
    clients = ClientProcesses({**spec, "address": f"{LOOPBACK}:{port}"}, [f"c{k:03d}" for k in range(n)], folder)
    try:
        deadline = time.monotonic() + CONNECT_S
        while connected[0] < n:
            clients.check_alive()
            if time.monotonic() > deadline:
                raise SystemExit(f"{connected[0]} of {n} gRPC clients connected in {CONNECT_S:g} s")
            time.sleep(0.1)
        seconds, first_up = [], []
        cpu = time.process_time()
        with PeakRss() as rss:
            for _ in range(spec["rounds"]):
                done.clear()
                started = time.perf_counter()
                for semaphore in go:
                    semaphore.release()
                for _ in range(n):
                    finished.acquire()
                seconds.append(time.perf_counter() - started)
                first_up.append(min(done) - started)
        cpu = time.process_time() - cpu
        sent = np.frombuffer(payload, np.uint8)
        intact = all(np.array_equal(np.frombuffer(buffer, np.uint8), sent) for buffer in buffers)
        server.stop(grace=2).wait()
        finished_clients = clients.finish()
    finally:
        clients.kill()
    return reference_result(seconds, first_up, cpu, rss, n, intact, finished_clients, spec["rounds"])


def case_role(spec: dict[str, Any]) -> None:
    """Run one case (in its own process) and print its numbers as a JSON line."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="transport-case-") as folder:
        run = {"fleet": fleet_case, "raw": raw_case, "grpc": grpc_case}[spec["mode"]]
        print(json.dumps(run(spec, Path(folder))), flush=True)


# -- the parent: every case, the table, the verdict ----------------------------------------------------------


@dataclass(frozen=True)
class Case:
    label: str
    mode: str  # "fleet" or "raw"
    clients: int
    nbytes: int
    tls: bool = False
    uploads: int = 4
    add: float = 0.0

    def spec(self, args: argparse.Namespace, certs: Path) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "clients": self.clients,
            "nbytes": self.nbytes,
            "tls": self.tls,
            "uploads": self.uploads,
            "add": self.add,
            "rounds": args.rounds,
            "chunk": args.chunk_kib << 10,
            "max_processes": args.max_processes,
            "certs": str(certs),
        }


def run_case(case: Case, args: argparse.Namespace, certs: Path) -> dict[str, Any]:
    """Run ``case`` in a fresh server process; its numbers."""
    started, load = time.perf_counter(), os.getloadavg()[0]
    done = subprocess.run(
        [sys.executable, __file__, "--role", "case", "--spec", json.dumps(case.spec(args, certs))],
        env={**os.environ, **PROXY_ENV},
        stdout=subprocess.PIPE,
        check=False,
    )
    lines = done.stdout.decode().strip().splitlines()
    if done.returncode != 0 or not lines:
        raise SystemExit(f"case {case.label} failed (exit {done.returncode}); its output is above")
    seconds = time.perf_counter() - started
    return {**json.loads(lines[-1]), "process_s": seconds, "load_before": load, "load_after": os.getloadavg()[0]}


def size_text(nbytes: int) -> str:
    if nbytes % GIB == 0:
        return f"{nbytes // GIB} GiB"
    if nbytes % MB:
        return f"{nbytes / 2**20:g} MiB"
    return f"{nbytes // MB} MB"


def cases_for(args: argparse.Namespace) -> list[tuple[Case, str | None]]:
    """Every case in run order, each with the label of its raw reference (``None`` for a reference)."""
    nbytes = int(args.mb * MB)
    cases: list[tuple[Case, str | None]] = []
    for i, n in enumerate(args.clients):
        raw = f"raw, {n} clients"
        cases.append((Case(raw, "raw", n, nbytes), None))
        if i == 0 and not args.skip_references:
            cases.append((Case(f"raw TLS, {n} clients", "raw", n, nbytes, True), raw))
            cases.append((Case(f"bare gRPC TLS, {n} clients", "grpc", n, nbytes, True), raw))
        for uploads in args.uploads if i == 0 else args.uploads[:1]:
            cases.append(
                (Case(f"fleet TLS, {n} clients, max_uploads={uploads}", "fleet", n, nbytes, True, uploads), raw)
            )
        if i == 0 and not args.skip_plaintext:
            cases.append((Case(f"fleet plaintext, {n} clients", "fleet", n, nbytes, False, args.uploads[0]), raw))
    if not args.skip_gib:
        gib = int(args.gib * GIB)
        raw = f"raw, 1 client, {size_text(gib)}"
        cases.append((Case(raw, "raw", 1, gib), None))
        cases.append((Case(f"fleet TLS, 1 client, {size_text(gib)}", "fleet", 1, gib, True, args.uploads[0], 1.0), raw))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50], help="fleet sizes to run")
    parser.add_argument("--mb", type=float, default=100.0, help="model size in MB (10^6 bytes)")
    parser.add_argument("--gib", type=float, default=1.0, help="model size of the one-client case, in GiB")
    parser.add_argument("--skip-gib", action="store_true", help="leave out the one-client 1 GiB case")
    parser.add_argument("--skip-plaintext", action="store_true", help="leave out the plaintext fleet cases")
    parser.add_argument(
        "--skip-references", action="store_true", help="leave out the TLS socket and bare gRPC references"
    )
    parser.add_argument(
        "--uploads",
        type=int,
        nargs="+",
        default=[4, 1],
        help="FleetServer max_uploads values; the first for every fleet case, the others (and the plaintext case) "
        "for the first --clients value only",
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds per case (the best one is reported)")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="fleet chunk size in KiB (fedloom's default)")
    parser.add_argument("--max-processes", type=int, default=10, help="client processes per case, at most")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--json", type=Path, help="also write every case's numbers here")
    parser.add_argument("--role", choices=("main", "case", "clients"), default="main", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.update(PROXY_ENV)
    if args.role == "case":
        case_role(json.loads(args.spec))
        return
    if args.role == "clients":
        clients_role(json.loads(args.spec))
        return
    if args.quick:
        args.clients, args.mb, args.gib, args.rounds = [4, 8], 4.0, 1 / 16, 1

    import grpc

    from fedloom.runtime.net.tls import init_certs

    print(
        f"# Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; grpcio {grpc.__version__}, NumPy {np.__version__}; "
        f"chunks of {args.chunk_kib} KiB; {args.rounds} round(s) per case, best reported; "
        f"at most {args.max_processes} client processes"
    )
    results: dict[str, dict[str, Any]] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="transport-certs-") as certs:
        init_certs(certs, hosts=[LOOPBACK])
        for case, reference in cases_for(args):
            print(f"# {case.label}: {size_text(case.nbytes)} each way per client ...", flush=True)
            result = run_case(case, args, Path(certs))
            results[case.label] = {"case": case.__dict__, "reference": reference, **result}
            best = min(result["transfer_s"])
            moved = 2 * case.clients * case.nbytes
            ratio = best / min(results[reference]["transfer_s"]) if reference else None
            round_s = min(result["round_s"]) if result["round_s"] else None
            rows.append(
                (
                    case.label,
                    f"{best:.2f}",
                    "-" if round_s is None else f"{round_s:.2f}",
                    f"{moved / best / 1e9:.2f}",
                    f"{min(result['first_up_s']):.2f}",
                    "-" if ratio is None else f"{ratio:.2f}x",
                    f"{result['server_cpu_s'] / args.rounds:.1f}",
                    f"{result['clients_cpu_s'] / args.rounds:.1f}",
                    f"{result['rss_peak_mib'] - result['rss_baseline_mib']:.0f}",
                    f"{result['max_rss_mib']:.0f}",
                    f"{result['client_process_max_rss_mib']:.0f}",
                    "yes" if result["intact"] else "NO",
                    f"{result['load_before']:.1f} / {result['load_after']:.1f}",
                )
            )
            print(f"#   {' | '.join(rows[-1][1:])}  ({result['process_s']:.0f} s with start-up)", flush=True)

    header = (
        "case",
        "transfer s",
        "round s",
        "GB/s",
        "1st up s",
        "vs raw",
        "server CPU s/round",
        "clients CPU s/round",
        "server peak RSS - baseline MiB",
        "server ru_maxrss MiB",
        "client proc max RSS MiB",
        "intact",
        "load before / after",
    )
    print()
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 3) + "---|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()

    nbytes = int(args.mb * MB)
    growth = {}  # clients -> the round's peak RSS over the baseline, MiB, at the first max_uploads
    for n in args.clients:
        peaks = []
        for u in args.uploads:
            if r := results.get(f"fleet TLS, {n} clients, max_uploads={u}"):
                over = r["rss_peak_mib"] - r["rss_baseline_mib"]
                growth.setdefault(n, over)
                peaks.append(f"max_uploads={u}: {over:,.0f} MiB over a baseline of {r['rss_baseline_mib']:.0f} MiB")
        print(
            f"server peak RSS, {n} clients of {size_text(nbytes)}: {'; '.join(peaks)} "
            f"(holding every update would take {n * nbytes / 2**20:,.0f} MiB)"
        )
    if len(growth) >= 2:
        (few, low), (many, high) = min(growth.items()), max(growth.items())
        flat = high <= 1.25 * low and high < many * nbytes / 2**20
        print(
            f"{'PASS' if flat else 'FAIL'}: the server's peak over its baseline went from {low:,.0f} MiB at {few} "
            f"clients to {high:,.0f} MiB at {many} ({high / low:.2f}x; target: flat in the number of clients, "
            f"within 1.25x, and below holding every update, {many * nbytes / 2**20:,.0f} MiB)"
        )
    target_n = 10 if 10 in args.clients else args.clients[0]
    fleet = results.get(f"fleet TLS, {target_n} clients, max_uploads={args.uploads[0]}")
    raw = results.get(f"raw, {target_n} clients")
    if fleet and raw:
        ratio = min(fleet["transfer_s"]) / min(raw["transfer_s"])
        verdict = "PASS" if ratio <= TARGET and fleet["intact"] else "FAIL"
        print(
            f"{verdict}: fleet TLS round, {target_n} clients of {size_text(nbytes)}: {min(fleet['transfer_s']):.2f} s, "
            f"{ratio:.2f}x the raw loopback sockets' {min(raw['transfer_s']):.2f} s (target <= {TARGET}x)"
        )
        for label in (f"raw TLS, {target_n} clients", f"bare gRPC TLS, {target_n} clients"):
            if measured := results.get(label):
                best = min(measured["transfer_s"])
                print(
                    f"  against {label}: {best:.2f} s ({best / min(raw['transfer_s']):.2f}x raw), "
                    f"so the fleet is {min(fleet['transfer_s']) / best:.2f}x that"
                )
    if not args.skip_gib:
        gib = int(args.gib * GIB)
        big = results[f"fleet TLS, 1 client, {size_text(gib)}"]
        best = min(big["transfer_s"])
        raw_best = min(results[f"raw, 1 client, {size_text(gib)}"]["transfer_s"])
        print(
            f"{size_text(gib)} model, 1 client, TLS: {best:.2f} s for {size_text(gib)} down and up "
            f"({2 * gib / best / 2**30:.2f} GiB/s), {best / raw_best:.2f}x raw ({raw_best:.2f} s); "
            f"aggregate == global + 1 per round exactly: {'yes' if big['intact'] else 'NO'}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
