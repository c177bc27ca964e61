"""The deployment's server: a gRPC server that clients dial out to, serving each one's ``Connect`` stream.

Each client holds one ``Connect`` stream open (see ``fleet.proto``). The server sends an instruction as the
chunks of its encoded message under a fresh message id; the client answers under the same id. Replies that
come after their round's deadline, a second reply to an instruction (a duplicate, or out of turn once the site is
asked for another round), or one under an id nobody sent the site, are declined, logged and recorded, each saying
which. A site has one session at a time; who may take the place of a connected site's session is decided in one
place (``_Servicer._take_place``): a token alone never pushes out a session that answers. What the streams
and the server's grid (:class:`~fedloom.runtime.net.grid.NetGrid`, ``FleetServer.grid``) share lives in
:mod:`fedloom.runtime.net.hub`; the gRPC options the client agent uses too, in :mod:`fedloom.runtime.net.options`.

>>> with FleetServer("127.0.0.1:50051") as server:          # doctest: +SKIP
...     server.wait_for_clients(3, timeout=60)
...     run_rounds(strategy=..., grid=server.grid, ...)
...     server.say_bye()
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import queue
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

import grpc

from fedloom.core.errors import ConfigError, DecodeError, FedloomError, NotEnoughClientsError, TransportError
from fedloom.runtime.net import fleet_pb2
from fedloom.runtime.net.frames import (
    CLIENT_FRAMES,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    SERVER_FRAMES,
    SERVICE,
    Chunk,
    Malformed,
    Reassembler,
    check_protocol_version,
    split_message,
    waiting,
)
from fedloom.runtime.net.grid import NetGrid
from fedloom.runtime.net.hub import Authenticator, Connection, Hub, Outgoing, refusal_frame
from fedloom.runtime.net.options import GRPC_OPTIONS, keepalive_options, parse_address
from fedloom.runtime.records import ClientEvent

__all__ = ["LIVE_SESSION", "PROBE_TIMEOUT", "FleetServer", "share_malloc_arenas"]

log = logging.getLogger("fedloom.server")

_NAME_MAX = 128
_POLL_S = 0.2  # how often a blocked stream checks whether it should end (and sends the pings that came)
#: The longest a site's session has to answer the server's ping when a second connection presents its token
#: (less where the heartbeat is shorter): a few round trips on a slow link, and not so long that a site
#: restarted after a crash waits long to get back in.
PROBE_TIMEOUT = 5.0


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


_M_ARENA_MAX = -8  # glibc's mallopt parameter number for MALLOC_ARENA_MAX
MALLOC_ARENAS = 2


def share_malloc_arenas(count: int = MALLOC_ARENAS) -> bool:
    """Make glibc's malloc share ``count`` arenas between all threads of this process, as the environment
    variable ``MALLOC_ARENA_MAX`` would (glibc reads that only at start-up); whether it did.

    glibc gives threads that allocate at the same time arenas of their own, up to 8 per core, and keeps memory
    freed in each arena for that arena's next use. The server's stream threads each pass a model through malloc
    in 1 MiB frames, so with an arena per thread its memory grows with the number of clients: measured with 50
    clients of 100 MB, 1,387 MiB over the baseline against 968 MiB with 10; with two arenas, 916 and 908 MiB
    (``benchmarks/RESULTS.md``). It changes the whole process; :class:`FleetServer` calls it when it is made,
    before its threads exist. It does nothing where ``MALLOC_ARENA_MAX`` is set (the operator chose) and on
    other C libraries than glibc."""
    if "MALLOC_ARENA_MAX" in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_ARENA_MAX, count))


_ClientFrame = fleet_pb2.ClientFrame | Chunk | Malformed
_ServerFrame = fleet_pb2.ServerFrame | Chunk


#: What a second connection with the token of a site whose session answers is told. It names no address: the
#: newcomer may be an intruder, and the site's address is none of its business.
LIVE_SESSION = (
    "this site already has a live session; if that is your own earlier process, stop it first; otherwise this "
    "site's token may have leaked: revoke it (`fedloom token revoke`), make a new one, and use mutual TLS"
)


class _Servicer:
    """Serves each client's ``Connect`` stream: the greeting, then instructions down and replies up.

    ``probe_timeout`` is how long a site's session has to answer the ping that a second connection with its
    token sets off (see :meth:`_take_place`). ``job_digest`` is the digest of the server's job, announced in
    every welcome; a site that names another in its hello is refused (empty: no job is checked)."""

    def __init__(
        self, hub: Hub, max_message_bytes: int, chunk_size: int, probe_timeout: float, job_digest: str = ""
    ) -> None:
        self._hub = hub
        self._max = max_message_bytes
        self._chunk_size = chunk_size
        self._probe_timeout = probe_timeout
        self._job_digest = job_digest

    def handler(self) -> grpc.GenericRpcHandler:
        """The service for gRPC, its frames read and written by :mod:`fedloom.runtime.net.frames`."""
        connect = grpc.stream_stream_rpc_method_handler(
            self.connect, request_deserializer=CLIENT_FRAMES.parse, response_serializer=SERVER_FRAMES.serialize
        )
        return grpc.method_handlers_generic_handler(SERVICE, {"Connect": connect})

    def connect(
        self, request_iterator: Iterator[_ClientFrame], context: grpc.ServicerContext
    ) -> Iterator[_ServerFrame]:
        try:
            first = next(request_iterator)
        except (StopIteration, grpc.RpcError):
            return
        name, refusal = self._admit(first, context)
        if name is None:
            log.warning("refused a client from %s: %s", context.peer(), refusal)
            self._hub.event(f"? {context.peer()}"[:_NAME_MAX], "refused", detail=refusal)
            yield refusal_frame(refusal)
            return
        assert isinstance(first, fleet_pb2.ClientFrame)  # _admit admits only a Hello
        hello = first.hello
        other_job = self._check_job(name, hello.job_digest)
        if other_job is not None:
            log.warning("refused client %s from %s: %s", name, context.peer(), other_job)
            self._hub.event(name, "refused", detail=other_job)
            yield refusal_frame(other_job)
            return
        connection = Connection(name, hello.token, queue.Queue(), context.peer(), hello.train_examples)
        taken = self._take_place(connection, certified=name in _certified(context))
        if taken is not None:
            yield refusal_frame(taken)
            return
        log.info("client %s connected from %s", name, connection.peer)
        if not context.add_callback(lambda: self._hub.disconnect(connection)):
            self._hub.disconnect(connection)  # its stream ended while the server pinged the site's other one
            return
        reader = threading.Thread(
            target=self._read, args=(connection, request_iterator), name=f"fleet-read-{name}", daemon=True
        )
        reader.start()
        welcome = fleet_pb2.Welcome(protocol_version=PROTOCOL_VERSION, client_name=name, job_digest=self._job_digest)
        yield fleet_pb2.ServerFrame(welcome=welcome)
        while True:
            yield from waiting(connection.urgent)
            try:
                item = connection.outbox.get(timeout=_POLL_S)
            except queue.Empty:
                if not context.is_active() or not connection.open:
                    break
                continue
            if item is None:
                break
            if isinstance(item, Outgoing):
                for chunk in split_message(item.message_id, item.parts, self._chunk_size):
                    if not connection.open:
                        break
                    yield chunk
                    yield from waiting(connection.urgent)
                continue
            yield item
        self._hub.disconnect(connection)

    def _take_place(self, connection: Connection, *, certified: bool) -> str | None:
        """Make ``connection`` its site's session and record it, or return why the newcomer is refused.

        A site has one live session. A site without one gets this connection. Where the site has one, the
        newcomer's credentials decide:

        - With a token alone, the newcomer may be anyone who holds the token (a leaked token, or the site started
          twice), so the session in place is asked first: the server pings it (:meth:`Hub.answers`, at most
          ``probe_timeout`` seconds). A session that answers is alive and keeps its place: the newcomer is
          refused with :data:`LIVE_SESSION`, and the server logs a warning naming both addresses and records the
          refusal in the site's timeline. A session that does not answer (its process died, its machine froze,
          its network went dark before the heartbeat noticed) is disconnected and the newcomer takes its place:
          a site restarted after a crash gets in at once, after at most ``probe_timeout`` seconds.
        - With a client certificate that names the site (mutual TLS, checked in :meth:`_admit`), the newcomer is
          the site itself, restarted: only the site holds its certificate's key. It takes the place at once; the
          old connection is told so and ends.

        The probe waits without the hub's lock. Two newcomers at once each find out in turn: the second probes
        whichever session holds the place when its own probe is over."""
        hub = self._hub
        name = connection.name
        silent: Connection | None = None  # a session found not to answer
        while True:
            with hub.cond:
                if hub.closing:
                    return "the server is shutting down"
                old = hub.connections.get(name)
                if old is None or old is silent or certified:
                    if old is not None:  # in the same step, so the site is never missing from the grid
                        _push_out(hub, old, connection, certified=certified)
                    hub.connections[name] = connection
                    hub.declared[name] = connection.examples
                    # Recorded before the loop can see the client (and send it work), so its timeline starts here.
                    hub.event(name, "connected", detail=_connected(connection))
                    hub.cond.notify_all()
                    return None
            if hub.answers(old, self._probe_timeout):
                log.warning(
                    "client %s: refused a second connection from %s with its token: its session from %s answers "
                    "(if that is not the site's own second process, its token may have leaked)",
                    name,
                    connection.peer,
                    old.peer,
                )
                hub.event(name, "refused", detail=f"a second connection from {connection.peer}: {LIVE_SESSION}")
                return LIVE_SESSION
            silent = old

    def _admit(self, frame: _ClientFrame, context: grpc.ServicerContext) -> tuple[str | None, str]:
        """The name of the client this first frame admits, or ``None`` and why it admits nobody. A client that
        presented a certificate (mutual TLS) must present its own: the certificate's name must be the token's."""
        if not isinstance(frame, fleet_pb2.ClientFrame) or frame.WhichOneof("frame") != "hello":
            return None, "the first frame must be a Hello"
        try:
            check_protocol_version(frame.hello.protocol_version, "the client")
        except DecodeError as exc:
            return None, str(exc)
        with self._hub.cond:
            if self._hub.closing:
                return None, "the server is shutting down"
        if not frame.hello.token:
            return None, "no token: connect with --token (from `fedloom token create` or an invitation)"
        try:
            name = self._hub.authenticate(frame.hello.token)
        except FedloomError as exc:
            log.error("cannot check a client's token: %s", exc)
            return None, "the server cannot check tokens right now; try again later"
        if name is None:
            return None, "unknown or revoked token"
        certified = _certified(context)
        if certified and name not in certified:
            return None, f"the client certificate names {certified[0]}, the token names {name}"
        return name, ""

    def _check_job(self, name: str, digest: str) -> str | None:
        """Why the site ``name``, whose hello names the job ``digest``, is refused: its job is not the server's;
        ``None`` to admit it. A site that names no job (an agent run without one) is admitted, with a warning:
        every ``fedloom client`` names its job."""
        if not self._job_digest or digest == self._job_digest:
            return None
        if not digest:
            log.warning("client %s named no job in its hello: its job is not checked", name)
            return None
        return (
            f"this site's job is not the server's (the server's digest {self._job_digest}, this site's {digest}): "
            "run the job file (or built-in example) that the server runs, unchanged"
        )

    def _read(self, connection: Connection, frames: Iterator[_ClientFrame]) -> None:
        """Take the client's replies until its stream ends; a frame that breaks the protocol ends its session.

        A reply is read only once granted (see ``fleet.proto``), and at most ``max_uploads`` replies are granted
        at once over all clients: a stream waits here for a free slot before it grants one. A reply that nobody
        awaits (after its deadline, a second reply to an instruction, one under the id of another round's
        instruction: see :meth:`Hub.turn_away`) or that is over the size limit is declined, so its bytes never
        come."""
        hub = self._hub
        reassembler = Reassembler(self._max, self._hub.buffers)
        granted: tuple[int, int] | None = None  # the reply being received: its message id and offered size
        started = 0.0  # when its first chunk came
        try:
            for frame in frames:
                if isinstance(frame, Malformed):
                    raise DecodeError(frame.reason)
                if isinstance(frame, Chunk):
                    if granted is None or frame.message_id != granted[0]:
                        raise DecodeError(f"a chunk of message {frame.message_id}, which the server did not ask for")
                    if frame.index == 0 and frame.total_size != granted[1]:
                        raise DecodeError(
                            f"message {frame.message_id} is {frame.total_size} bytes, not the {granted[1]} it offered"
                        )
                    if frame.index == 0:
                        started = time.perf_counter()
                    box = [reassembler.feed(frame)]  # deliver takes the message out: nothing here keeps it
                    if box[0] is not None:
                        granted = None
                        try:
                            hub.deliver(connection, box, started)
                        finally:
                            hub.uploads.release()
                    continue
                if frame.WhichOneof("frame") == "pong":  # may come between a granted reply's chunks
                    hub.pong(connection, frame.pong.nonce)
                    continue
                if frame.WhichOneof("frame") != "offer" or granted is not None:
                    raise DecodeError("only offers, and the chunks of a granted reply, may follow the Hello")
                granted = self._grant(connection, frame.offer.message_id, frame.offer.size)
        except DecodeError as exc:
            log.warning("client %s: refused its frame and disconnected it: %s", connection.name, exc)
            hub.event(connection.name, "refused", detail=f"malformed frame: {exc}")
            connection.outbox.put(refusal_frame(str(exc)))
        except grpc.RpcError:
            pass  # the stream ended; the disconnect callback has the rest
        finally:
            if granted is not None:
                hub.uploads.release()
        hub.disconnect(connection)

    def _grant(self, connection: Connection, message_id: int, size: int) -> tuple[int, int] | None:
        """Answer an offer: grant it (holding an upload slot until the reply is in) and return what is granted,
        or decline it and return ``None``."""
        hub = self._hub
        if size > self._max:
            reason = f"reply {message_id} is {size} bytes, over the limit of {self._max} bytes"
            if not hub.refuse(connection, message_id, reason):  # else its round logs the refusal, once
                log.warning("client %s: declined its reply: %s", connection.name, reason)
            connection.outbox.put(_decline(message_id, reason))
            return None
        if hub.expects(connection, message_id) and _acquire(hub.uploads, connection):
            if hub.expects(connection, message_id):  # still: the deadline may have passed while it waited
                connection.outbox.put(fleet_pb2.ServerFrame(grant=fleet_pb2.Grant(message_id=message_id)))
                return message_id, size
            hub.uploads.release()
        if connection.open:
            connection.outbox.put(_decline(message_id, hub.turn_away(connection, message_id, size)))
        return None


def _certified(context: grpc.ServicerContext) -> list[str]:
    """The names (common names) of the client certificate the peer presented, under mutual TLS; none without."""
    return [n.decode(errors="replace") for n in context.auth_context().get("x509_common_name", [])]


def _push_out(hub: Hub, old: Connection, new: Connection, *, certified: bool) -> None:
    """End the session ``old`` because ``new`` takes its place: ``new`` presented the site's certificate (``old``
    is told, and its client ends), or ``old`` stopped answering (its stream just ends)."""
    if certified:
        old.outbox.put(refusal_frame("this site connected again with its certificate; this older connection is closed"))
        hub.disconnect(old, f"replaced by a new connection from {new.peer} with the site's certificate")
        return
    log.warning(
        "client %s: its session from %s stopped answering; a new connection from %s takes its place",
        old.name,
        old.peer,
        new.peer,
    )
    hub.disconnect(old, f"stopped answering; replaced by a new connection from {new.peer}")


def _connected(connection: Connection) -> str:
    """The detail of a client's ``connected`` event: where from, and what it declared in its hello."""
    declared = f"{connection.examples} training examples" if connection.examples else "no training examples"
    return f"{connection.peer}; declared {declared}"


def _decline(message_id: int, reason: str) -> fleet_pb2.ServerFrame:
    return fleet_pb2.ServerFrame(decline=fleet_pb2.Decline(message_id=message_id, reason=reason))


def _acquire(slots: threading.BoundedSemaphore, connection: Connection) -> bool:
    """Wait for an upload slot while ``connection`` is open; whether one was taken."""
    while connection.open:
        if slots.acquire(timeout=_POLL_S):
            return True
    return False


class FleetServer:
    """A gRPC server for the fleet protocol, listening on exactly ``address`` (``HOST:PORT``).

    ``authenticate`` maps a client's token to its name (``None``: refused); see
    :meth:`fedloom.tracking.tokens.TokenStore.authenticate`. ``credentials`` (see
    :func:`fedloom.runtime.net.tls.server_credentials`) make it serve TLS only; without them it serves
    plaintext, and says so in a warning when it starts.

    ``max_clients`` bounds the streams held open at once (each holds a worker thread of the server);
    ``max_uploads`` bounds the replies granted (sent and read) at once, which bounds the server's memory: with
    FedAvg it holds the aggregate and those replies, however many clients there are. ``heartbeat`` is the
    seconds between HTTP/2 keepalive pings to each client; a client that does not answer one within
    ``heartbeat`` seconds is taken as gone.

    A site has one live session: a second connection with the token of a site whose session still answers a
    ping (within ``min(heartbeat, PROBE_TIMEOUT)`` seconds) is refused with :data:`LIVE_SESSION` and a warning
    naming both addresses, so whoever else holds a site's token can neither push the site out nor take its
    place; one whose session does not answer replaces it, and so does one whose client certificate names the
    site (mutual TLS: the site itself, restarted). What each site declared in its hello (its training examples)
    is ``grid.declared_examples(site)``. With ``job_digest`` (see :mod:`fedloom.app.jobdigest`) the server
    announces its job in every welcome and refuses, naming both digests, a site whose hello names another job
    before it is sent any work. Making one limits glibc's malloc arenas in this process (see
    :func:`share_malloc_arenas`). Raises :class:`ConfigError` for a malformed address and
    :class:`TransportError` when the address cannot be listened on (a port in use, a host that is not this
    machine's). Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        address: str,
        *,
        authenticate: Authenticator,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_clients: int = 256,
        max_uploads: int = 4,
        heartbeat: float = 30.0,
        credentials: grpc.ServerCredentials | None = None,
        job_digest: str = "",
    ) -> None:
        _check_free(*parse_address(address), address)
        if max_uploads < 1:
            raise ConfigError(f"max_uploads must be >= 1, got {max_uploads}")
        share_malloc_arenas()  # before gRPC's threads exist
        self.address = address
        self.tls = credentials is not None
        self._hub = Hub(authenticate, max_uploads)
        self.grid = NetGrid(self._hub)
        # One worker per stream, plus a few for streams being refused. Without so_reuseport=0, gRPC would let
        # a second server bind a port that is already in use.
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=max_clients + 4, thread_name_prefix="fleet"),
            options=[*GRPC_OPTIONS, *keepalive_options(heartbeat), ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=max_clients + 4,
        )
        servicer = _Servicer(
            self._hub, max_message_bytes, chunk_size, min(heartbeat, PROBE_TIMEOUT), job_digest=job_digest
        )
        self._server.add_generic_rpc_handlers([servicer.handler()])
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
            log.warning("listening on %s without TLS: traffic, tokens included, is unencrypted", self.address)
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

    def notify(self, client_id: str, text: str) -> None:
        """Send ``text`` to ``client_id`` for its log (if it is connected): why its update was refused."""
        with self._hub.cond:
            connection = self._hub.connections.get(client_id)
        if connection is not None:
            connection.outbox.put(fleet_pb2.ServerFrame(notice=fleet_pb2.Notice(text=text)))

    def take_events(self) -> list[ClientEvent]:
        """The client events since the last call, oldest first (for the run store's client timeline)."""
        with self._hub.cond:
            events, self._hub.events = self._hub.events, []
        return events

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
