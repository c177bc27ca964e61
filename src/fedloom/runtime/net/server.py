"""The deployment grid: a gRPC server that clients dial out to, and :class:`NetGrid`, the server's view of them.

Each client holds one ``Connect`` stream open (see ``fleet.proto``). The server sends an instruction as the
chunks of its encoded message under a fresh message id; the client answers under the same id. Replies that
come after their round's deadline, or under an id nobody waits for, are logged and dropped.

>>> with FleetServer("127.0.0.1:50051") as server:          # doctest: +SKIP
...     server.wait_for_clients(3, timeout=60)
...     run_rounds(strategy=..., grid=server.grid, ...)
...     server.say_bye()
"""

from __future__ import annotations

import itertools
import logging
import queue
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc

from fedloom.core.codec import decode_message, encode_message
from fedloom.core.errors import ConfigError, DecodeError, NotEnoughClientsError, TransportError
from fedloom.core.message import Message
from fedloom.runtime.grid import Exchange, Reply
from fedloom.runtime.net import fleet_pb2, fleet_pb2_grpc
from fedloom.runtime.net.frames import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_MESSAGE_BYTES,
    GRPC_FRAME_LIMIT,
    PROTOCOL_VERSION,
    Reassembler,
    check_protocol_version,
    split_message,
)

__all__ = ["FleetServer", "NetGrid", "parse_address"]

log = logging.getLogger("fedloom.server")

_NAME_MAX = 128
_POLL_S = 0.2  # how often a blocked stream checks whether it should end
GRPC_OPTIONS = (
    ("grpc.max_receive_message_length", GRPC_FRAME_LIMIT),
    ("grpc.max_send_message_length", GRPC_FRAME_LIMIT),
)


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[IPv6]:PORT``) as ``(host, port)``; :class:`ConfigError` if it is not one."""
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"address {address!r} is not HOST:PORT with a port in 1..65535")
    return host, int(port_text)


def _check_free(host: str, port: int, address: str) -> None:
    """Raise :class:`TransportError` if ``host:port`` cannot be bound, before gRPC tries (gRPC would log its
    own multi-line error first)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TransportError(f"cannot listen on {address}: {exc.strerror}") from None
    family, kind, proto, _name, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            raise TransportError(f"cannot listen on {address}: {exc.strerror or exc}") from None


@dataclass
class _Connection:
    """One connected client: its name and the frames waiting to be sent down its stream (``None`` ends it)."""

    name: str
    outbox: queue.Queue[fleet_pb2.ServerFrame | None]
    open: bool = True


class _Hub:
    """What the stream handlers and :class:`NetGrid` share, under one condition variable: who is connected,
    which message ids await replies (id -> client name), and the replies that came (id -> bytes, time)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.connections: dict[str, _Connection] = {}
        self.awaiting: dict[int, str] = {}
        self.arrived: dict[int, tuple[bytes, float]] = {}
        self.ids = itertools.count(1)
        self.closing = False

    def deliver(self, name: str, message_id: int, data: bytes) -> None:
        with self.cond:
            if self.awaiting.get(message_id) != name:
                log.warning("client %s: reply %d came late or unasked; dropped", name, message_id)
                return
            self.arrived[message_id] = (data, time.perf_counter())
            self.cond.notify_all()

    def disconnect(self, connection: _Connection) -> None:
        with self.cond:
            if not connection.open:
                return
            connection.open = False
            if self.connections.get(connection.name) is connection:
                del self.connections[connection.name]
            self.cond.notify_all()
        connection.outbox.put(None)
        log.info("client %s disconnected", connection.name)


class _Servicer(fleet_pb2_grpc.FleetServicer):
    """Serves each client's ``Connect`` stream: the greeting, then instructions down and replies up."""

    def __init__(self, hub: _Hub, max_message_bytes: int) -> None:
        self._hub = hub
        self._max = max_message_bytes

    def Connect(  # noqa: N802 (the name is the gRPC method's)
        self, request_iterator: Iterator[fleet_pb2.ClientFrame], context: grpc.ServicerContext
    ) -> Iterator[fleet_pb2.ServerFrame]:
        try:
            first = next(request_iterator)
        except (StopIteration, grpc.RpcError):
            return
        refusal = self._refusal(first)
        if refusal is not None:
            log.warning("refused a client from %s: %s", context.peer(), refusal)
            yield fleet_pb2.ServerFrame(refusal=fleet_pb2.Refusal(reason=refusal))
            return
        connection = _Connection(first.hello.client_name, queue.Queue())
        with self._hub.cond:
            self._hub.connections[connection.name] = connection
            self._hub.cond.notify_all()
        log.info("client %s connected from %s", connection.name, context.peer())
        context.add_callback(lambda: self._hub.disconnect(connection))
        reader = threading.Thread(
            target=self._read, args=(connection, request_iterator), name=f"fleet-read-{connection.name}", daemon=True
        )
        reader.start()
        yield fleet_pb2.ServerFrame(welcome=fleet_pb2.Welcome(protocol_version=PROTOCOL_VERSION))
        while True:
            try:
                frame = connection.outbox.get(timeout=_POLL_S)
            except queue.Empty:
                if not context.is_active() or not connection.open:
                    break
                continue
            if frame is None:
                break
            yield frame
        self._hub.disconnect(connection)

    def _refusal(self, frame: fleet_pb2.ClientFrame) -> str | None:
        """Why this first frame cannot open a client's session, or ``None`` if it can."""
        if frame.WhichOneof("frame") != "hello":
            return "the first frame must be a Hello"
        try:
            check_protocol_version(frame.hello.protocol_version, "the client")
        except DecodeError as exc:
            return str(exc)
        name = frame.hello.client_name
        if not name or len(name) > _NAME_MAX or not name.isprintable():
            return f"a client name must be 1 to {_NAME_MAX} printable characters"
        with self._hub.cond:
            if self._hub.closing:
                return "the server is shutting down"
            if name in self._hub.connections:
                return f"a client named {name!r} is already connected"
        return None

    def _read(self, connection: _Connection, frames: Iterator[fleet_pb2.ClientFrame]) -> None:
        """Reassemble the client's replies until its stream ends; a malformed frame ends its session."""
        reassembler = Reassembler(self._max)
        try:
            for frame in frames:
                if frame.WhichOneof("frame") != "chunk":
                    raise DecodeError("only chunks may follow the Hello")
                done = reassembler.feed(frame.chunk)
                if done is not None:
                    self._hub.deliver(connection.name, *done)
        except DecodeError as exc:
            log.warning("client %s sent a malformed frame, disconnecting it: %s", connection.name, exc)
            connection.outbox.put(fleet_pb2.ServerFrame(refusal=fleet_pb2.Refusal(reason=str(exc))))
        except grpc.RpcError:
            pass  # the stream ended; the disconnect callback has the rest
        self._hub.disconnect(connection)


class NetGrid:
    """The :class:`~fedloom.runtime.grid.Grid` of a deployment: the clients connected to a :class:`FleetServer`.

    ``client_ids()`` are the connected clients' names, sorted. ``send_and_receive`` sends each message down its
    client's stream (in chunks of ``chunk_size``) and waits, at most ``timeout`` seconds, for the replies. A
    client that is not connected, disconnects, does not reply in time, or replies with bytes that do not
    decode is in ``Exchange.dropped`` (the last two are logged). Replies come in the order of ``messages``,
    so a strategy aggregates them in the same order as in simulation. ``Reply.seconds`` is the wall time from
    sending to the whole reply's arrival; ``bytes_down``/``bytes_up`` are the encoded messages' sizes.
    """

    def __init__(self, hub: _Hub, chunk_size: int) -> None:
        self._hub = hub
        self._chunk_size = chunk_size

    def client_ids(self) -> Sequence[str]:
        with self._hub.cond:
            return sorted(self._hub.connections)

    def send_and_receive(self, messages: Mapping[str, Message], timeout: float | None = None) -> Exchange:
        hub = self._hub
        deadline = None if timeout is None else time.perf_counter() + timeout
        sent: dict[str, tuple[int, int, float]] = {}  # client -> (message id, bytes down, send time)
        for client_id, message in messages.items():
            data = encode_message(message)
            with hub.cond:
                connection = hub.connections.get(client_id)
                if connection is None:
                    continue
                message_id = next(hub.ids)
                hub.awaiting[message_id] = client_id
            sent[client_id] = (message_id, len(data), time.perf_counter())
            for chunk in split_message(message_id, data, self._chunk_size):
                connection.outbox.put(fleet_pb2.ServerFrame(chunk=chunk))
        with hub.cond:
            hub.cond.wait_for(lambda: self._settled(sent), None if deadline is None else deadline - time.perf_counter())
            arrived = {cid: hub.arrived.pop(sent[cid][0]) for cid in sent if sent[cid][0] in hub.arrived}
            for message_id, _down, _at in sent.values():
                hub.awaiting.pop(message_id, None)
        replies: dict[str, Reply] = {}
        dropped: list[str] = []
        for client_id in messages:
            if client_id not in arrived:
                if client_id in sent:
                    log.warning("client %s did not reply to its %s instruction", client_id, messages[client_id].kind)
                dropped.append(client_id)
                continue
            up, received = arrived[client_id]
            _id, down, started = sent[client_id]
            try:
                reply = decode_message(up)
            except DecodeError as exc:
                log.warning("client %s replied with a malformed message: %s", client_id, exc)
                dropped.append(client_id)
                continue
            replies[client_id] = Reply(reply, received - started, down, len(up))
        return Exchange(replies, tuple(dropped))

    def _settled(self, sent: Mapping[str, tuple[int, int, float]]) -> bool:
        """Whether every addressed client has replied or is gone (called under the hub's lock)."""
        hub = self._hub
        return all(
            message_id in hub.arrived or client_id not in hub.connections
            for client_id, (message_id, _down, _at) in sent.items()
        )


class FleetServer:
    """A gRPC server for the fleet protocol, listening on exactly ``address`` (``HOST:PORT``).

    ``credentials`` (see :func:`fedloom.runtime.net.tls.server_credentials`) make it serve TLS only; without
    them it serves plaintext, and says so in a warning when it starts.

    ``max_clients`` bounds the streams held open at once (each holds a worker thread of the server).
    Raises :class:`ConfigError` for a malformed address and :class:`TransportError` when the address cannot
    be listened on (a port in use, a host that is not this machine's). Use it as a context manager, or call
    :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        address: str,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_clients: int = 256,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        _check_free(*parse_address(address), address)
        self.address = address
        self.tls = credentials is not None
        self._hub = _Hub()
        self.grid = NetGrid(self._hub, chunk_size)
        # One worker per stream, plus a few for streams being refused. Without so_reuseport=0, gRPC would let
        # a second server bind a port that is already in use.
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=max_clients + 4, thread_name_prefix="fleet"),
            options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=max_clients + 4,
        )
        generated = fleet_pb2_grpc.add_FleetServicer_to_server  # generated code, untyped
        generated(_Servicer(self._hub, max_message_bytes), self._server)  # type: ignore[no-untyped-call]
        try:
            if credentials is None:
                port = self._server.add_insecure_port(address)
            else:
                port = self._server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            port = 0
            reason: Any = exc
        else:
            reason = "the port is in use or the host is not this machine's"
        if port == 0:
            raise TransportError(f"cannot listen on {address}: {reason}")

    def start(self) -> FleetServer:
        self._server.start()
        if self.tls:
            log.info("listening on %s with TLS", self.address)
        else:
            log.warning("listening on %s without TLS: traffic is unencrypted, clients unauthenticated", self.address)
        return self

    def wait_for_clients(self, count: int, timeout: float) -> list[str]:
        """Wait until at least ``count`` clients are connected and return their names (sorted); raise
        :class:`NotEnoughClientsError`, naming those who came, if that takes more than ``timeout`` seconds."""
        with self._hub.cond:
            if not self._hub.cond.wait_for(lambda: len(self._hub.connections) >= count, timeout):
                came = sorted(self._hub.connections)
                raise NotEnoughClientsError(
                    f"{len(came)} of the {count} clients needed connected to {self.address} within {timeout:g} s"
                    + (f" ({', '.join(came)})" if came else "")
                )
            return sorted(self._hub.connections)

    def say_bye(self, grace: float = 5.0) -> None:
        """Tell every connected client that the federation is over and wait (at most ``grace`` seconds) for
        the streams to close. New clients are refused from now on."""
        with self._hub.cond:
            self._hub.closing = True
            connections = list(self._hub.connections.values())
        for connection in connections:
            connection.outbox.put(fleet_pb2.ServerFrame(bye=fleet_pb2.Bye()))
            connection.outbox.put(None)
        with self._hub.cond:
            self._hub.cond.wait_for(lambda: not self._hub.connections, grace)

    def stop(self, grace: float = 1.0) -> None:
        with self._hub.cond:
            self._hub.closing = True
            connections = list(self._hub.connections.values())
        for connection in connections:
            connection.outbox.put(None)
        self._server.stop(grace).wait(grace + 1.0)

    def __enter__(self) -> FleetServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
