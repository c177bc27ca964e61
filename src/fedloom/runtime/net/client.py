"""The client agent of a deployment: dial out to the server, then answer its instructions until it says bye.

The agent opens one ``Connect`` stream (see ``fleet.proto``), presents its token, and then, for every
instruction the server sends, runs the site's client app (:class:`~fedloom.runtime.client.ClientApp`: the
task inside its mods) on this site's own data and offers the encoded reply under the instruction's message id;
it sends the reply when the server grants the offer (the server reads a few replies at a time), and drops it
when the server declines (the reply is too large, or its round is over). The same code as in simulation
computes the reply; only the transport differs. Its hello declares the site's training examples (the rows of
its data's training split). A thread of its own reads the stream and answers the server's pings at once, while
the task runs in the calling thread: a site that trains for minutes still shows the server that its session is
alive, so a second connection with its token is refused instead of taking its place (see ``fleet.proto``).

A deployed site's app (:func:`fedloom.runtime.client.client_app` with ``deployed=True``) answers a task that
raises with a failure, logging the error with its traceback: the server records the client as dropped for that
round, with the error, and the agent stays connected for the next instruction (an app without that mod ends
the agent with the task's error). Every reply of that app carries the client's telemetry
(:mod:`fedloom.runtime.telemetry`): its system metrics, the seconds the instruction took to arrive, and, unless
the app's ``send_logs`` is off, the lines it logged while answering (the failure's traceback included). The
agent, not the app, states in each reply the round and kind of the instruction it answers and the SHA-256 of the
model it gave the app (:mod:`fedloom.runtime.binding`): the server refuses a reply bound to another instruction.

When the connection is lost (the server restarts, the network fails, a heartbeat goes unanswered) the agent
reconnects, with pauses doubling from 0.5 s up to 30 s, and rejoins at the server's next instruction; a reply
it was computing when the connection went is lost with it. What cannot get better by trying again ends the
agent with a :class:`~fedloom.core.errors.TransportError`: a refused token, a TLS mismatch, a server that
shuts down, a site whose session another process holds and answers for (trying again would be refused again;
a restarted site whose old process is really gone is let in at its first try, once the server's ping to the
old connection goes unanswered).

gRPC reaches the server through the proxy in ``https_proxy``/``http_proxy`` (or ``grpc_proxy``) where one is
set, unless the server's host is listed in ``no_proxy``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from fedloom.core.codec import decode_message, message_parts
from fedloom.core.errors import DecodeError, TransportError
from fedloom.data.base import ClientData
from fedloom.runtime.binding import stated, statement
from fedloom.runtime.client import ClientApp, Context
from fedloom.runtime.net import fleet_pb2
from fedloom.runtime.net.frames import (
    CLIENT_FRAMES,
    CONNECT_METHOD,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    SERVER_FRAMES,
    Chunk,
    Malformed,
    Reassembler,
    check_protocol_version,
    split_message,
    waiting,
)
from fedloom.runtime.net.options import GRPC_OPTIONS, keepalive_options, parse_address
from fedloom.runtime.state import DirectoryState
from fedloom.strategy.local import ClientState

__all__ = ["Backoff", "run_client"]

log = logging.getLogger("fedloom.client")

_FIRST_PAUSE = 0.5
_LONGEST_PAUSE = 30.0
_POLL_S = 0.2  # how often an idle outgoing stream sends the pongs that came
_Outbox = queue.Queue[fleet_pb2.ClientFrame | tuple[int, tuple[bytes | memoryview, ...]] | None]
_ServerFrame = fleet_pb2.ServerFrame | Chunk | Malformed
_ClientFrame = fleet_pb2.ClientFrame | Chunk
_Inbox = queue.Queue[_ServerFrame | grpc.RpcError | None]  # None: the stream ended


def connect_call(channel: grpc.Channel) -> grpc.StreamStreamMultiCallable:
    """The fleet's ``Connect`` method on ``channel``, its frames written and read by
    :mod:`fedloom.runtime.net.frames`."""
    return channel.stream_stream(
        CONNECT_METHOD, request_serializer=CLIENT_FRAMES.serialize, response_deserializer=SERVER_FRAMES.parse
    )


class Backoff:
    """Pauses between tries that double from 0.5 s up to 30 s, for at most ``retry_for`` seconds since the
    last success (or since it was made).

    >>> backoff = Backoff(retry_for=60)
    >>> backoff.wait("connection refused")   # sleeps 0.5 s, then 1 s next time...   # doctest: +SKIP
    """

    def __init__(self, retry_for: float, what: str = "the server") -> None:
        self._retry_for = retry_for
        self._what = what
        self.succeeded()

    def succeeded(self) -> None:
        self._since = time.monotonic()
        self._pause = _FIRST_PAUSE

    def wait(self, failure: str) -> None:
        """Sleep before the next try, or raise :class:`TransportError` (with ``failure``) if the next try would
        come more than ``retry_for`` seconds after the last success."""
        waited = time.monotonic() - self._since
        if waited + self._pause > self._retry_for:
            raise TransportError(
                f"cannot reach {self._what}: tried for {waited:.0f} s (--retry-for {self._retry_for:g}); "
                f"last error: {failure}"
            )
        log.warning("%s not reachable (%s); trying again in %.1f s", self._what, failure, self._pause)
        time.sleep(self._pause)
        self._pause = min(self._pause * 2, _LONGEST_PAUSE)


def run_client(
    app: ClientApp,
    data: ClientData,
    *,
    server: str,
    token: str,
    retry_for: float = 600.0,
    connect_timeout: float = 2.0,
    heartbeat: float = 30.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    credentials: grpc.ChannelCredentials | None = None,
    state: ClientState | None = None,
    job_digest: str = "",
    explain: Callable[[str], str | None] | None = None,
) -> int:
    """Serve as the client that ``token`` names in the federation at ``server`` (``HOST:PORT``) until it says
    bye, and return how many instructions were answered.

    With ``credentials`` (see :func:`fedloom.runtime.net.tls.channel_credentials`) the connection is TLS, and
    the server's certificate must name the host in ``server``; without them it is plaintext (with a warning).
    Each connection attempt waits up to ``connect_timeout`` seconds; the agent keeps trying, with pauses
    doubling from 0.5 s to 30 s, for ``retry_for`` seconds from the start or from when a connection was lost.
    ``heartbeat`` is the seconds between keepalive pings to the server. ``state`` is where this client keeps
    what an algorithm carries from round to round (SCAFFOLD's control variate...), across reconnects and
    restarts: a :class:`~fedloom.runtime.state.DirectoryState` on this machine's disk. ``app`` answers each
    instruction (what it keeps between messages, such as an open secure aggregation round, outlives a
    reconnection). ``job_digest`` names the job this site runs (:mod:`fedloom.app.jobdigest`) in its hello: a
    server that runs another refuses the site, naming both digests, before it is sent any work. ``explain`` is
    asked, with gRPC's account, why a TLS handshake failed, when the certificates can tell more than gRPC does
    (see :func:`fedloom.runtime.net.validity.handshake_cause`: a certificate outside its validity period). Raises
    :class:`~fedloom.core.errors.ConfigError` for a malformed address; :class:`TransportError` when the
    server stays out of reach for ``retry_for`` seconds, for a TLS mismatch (naming its likely cause), when
    the server refuses this client or ends its session; :class:`DecodeError` when it sends malformed frames.
    """
    parse_address(server)
    options = [*GRPC_OPTIONS, *keepalive_options(heartbeat)]
    tls = credentials is not None
    answered = 0
    backoff = Backoff(retry_for, f"the server at {server}")
    while True:
        if credentials is None:
            channel = grpc.insecure_channel(server, options=options)
        else:
            channel = grpc.secure_channel(server, credentials, options=options)
        with channel:
            failure = _connect_failure(channel, connect_timeout)
            if failure is None:
                if not tls:
                    log.warning("connected to %s without TLS: traffic is unencrypted", server)
                session = _Session(app, data, channel, server, chunk_size, max_message_bytes, state)
                bye = session.run(token, job_digest)
                answered += session.answered
                if bye:
                    log.info("the server said bye after %d instructions", answered)
                    if isinstance(state, DirectoryState):
                        state.commit()  # the run is over: every round it trained in is complete
                    return answered
                if session.welcomed:
                    backoff.succeeded()
                failure = session.lost or "the stream ended"
            else:
                mismatch = _tls_mismatch(failure, server, tls=tls, explain=explain)
                if mismatch is not None:
                    raise TransportError(mismatch)
        backoff.wait(failure)


class _Session:
    """One connection's stream: the greeting, then instructions answered until bye or the stream is lost."""

    def __init__(
        self,
        app: ClientApp,
        data: ClientData,
        channel: grpc.Channel,
        server: str,
        chunk_size: int,
        max_bytes: int,
        state: ClientState | None,
    ) -> None:
        self._app = app
        self._state = state
        self._name = ""
        self._data = data
        self._channel = channel
        self._server = server
        self._chunk_size = chunk_size
        self._max = max_bytes
        self.answered = 0
        self.welcomed = False
        self.lost: str | None = None
        self._offered: dict[int, tuple[bytes | memoryview, ...]] = {}  # replies offered, not yet granted

    def run(self, token: str, job_digest: str) -> bool:
        """Serve the stream; ``True`` if the server said bye, ``False`` if the connection was lost (why is in
        :attr:`lost`). Raises :class:`TransportError` for a refusal, :class:`DecodeError` for bad frames.

        The hello declares this site's training examples (its data's training split): the client agent says
        it, not the task, and the server caps every update's example count at it. It names the site's job by
        ``job_digest``, which the server checks against its own."""
        outbox: _Outbox = queue.Queue()
        urgent: queue.Queue[fleet_pb2.ClientFrame] = queue.Queue()
        examples = len(self._data.train)
        hello = fleet_pb2.Hello(
            protocol_version=PROTOCOL_VERSION, token=token, train_examples=examples, job_digest=job_digest
        )
        outbox.put(fleet_pb2.ClientFrame(hello=hello))
        frames = connect_call(self._channel)(self._drain(outbox, urgent))
        try:
            return self._serve(frames, outbox, urgent)
        except grpc.RpcError as exc:
            self.lost = _describe(exc)
            return False
        finally:
            outbox.put(None)
            frames.cancel()

    def _drain(self, outbox: _Outbox, urgent: queue.Queue[fleet_pb2.ClientFrame]) -> Iterator[_ClientFrame]:
        """The frames to send, as gRPC's request iterator wants them, a reply cut into chunks only as it is
        sent; ``None`` in the queue ends the stream. The pongs in ``urgent`` go first, between a reply's
        chunks too."""
        while True:
            yield from waiting(urgent)
            try:
                item = outbox.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if item is None:
                return
            if isinstance(item, tuple):
                message_id, parts = item
                for chunk in split_message(message_id, parts, self._chunk_size):
                    yield chunk
                    yield from waiting(urgent)
            else:
                yield item

    def _serve(
        self, frames: Iterator[_ServerFrame], outbox: _Outbox, urgent: queue.Queue[fleet_pb2.ClientFrame]
    ) -> bool:
        server = self._server
        greeting = next(frames, None)
        if greeting is None:
            raise TransportError(f"the server at {server} refused this client: it closed the stream")
        if isinstance(greeting, Malformed):
            raise DecodeError(f"the server at {server} sent {greeting.reason}")
        if isinstance(greeting, Chunk) or greeting.WhichOneof("frame") not in ("welcome", "refusal"):
            raise DecodeError(f"the server at {server} opened with a {_kind(greeting)} frame instead of a Welcome")
        if greeting.WhichOneof("frame") == "refusal":
            raise TransportError(f"the server at {server} refused this client: {greeting.refusal.reason}")
        check_protocol_version(greeting.welcome.protocol_version, f"the server at {server}")
        self.welcomed = True
        name = self._name = greeting.welcome.client_name
        announced = greeting.welcome.job_digest
        log.info("joined the federation at %s as client %s%s", server, name, f" (job {announced})" if announced else "")
        inbox: _Inbox = queue.Queue()
        threading.Thread(target=_read, args=(frames, inbox, urgent), name="fleet-read", daemon=True).start()
        reassembler = Reassembler(self._max)
        receiving_since = 0.0  # when the first chunk of the instruction being received came
        while (frame := inbox.get()) is not None:
            if isinstance(frame, grpc.RpcError):
                raise frame
            if isinstance(frame, Malformed):
                raise DecodeError(f"the server at {server} sent {frame.reason}")
            if isinstance(frame, Chunk):
                if frame.index == 0:
                    receiving_since = time.perf_counter()
                box = [reassembler.feed(frame)]  # _answer takes the message out: nothing here keeps its buffer
                del frame
                if box[0] is not None:
                    self._answer(box, outbox, time.perf_counter() - receiving_since)
                continue
            kind = _kind(frame)
            if kind == "grant":
                parts = self._offered.pop(frame.grant.message_id, None)
                if parts is None:
                    raise DecodeError(f"the server at {server} asked for a reply this client did not offer")
                outbox.put((frame.grant.message_id, parts))
                continue
            if kind == "decline":
                decline = frame.decline
                self._offered.pop(decline.message_id, None)
                log.warning("the server declined the reply to instruction %d: %s", decline.message_id, decline.reason)
                continue
            if kind == "bye":
                return True
            if kind == "notice":
                log.warning("the server says: %s", frame.notice.text)
                continue
            if kind == "refusal":
                raise TransportError(f"the server at {server} ended the session of {name!r}: {frame.refusal.reason}")
            raise DecodeError(f"the server at {server} sent an unexpected {kind} frame")
        self.lost = "the server closed the stream without saying bye"
        return False

    def _answer(self, box: list[tuple[int, memoryview] | None], outbox: _Outbox, received_seconds: float) -> None:
        """Run the instruction in ``box`` (its message id and bytes, taken out) through the app and offer the
        reply, stating what it answers (:mod:`fedloom.runtime.binding`); it is sent when the server grants it. The
        instruction's arrays are views of the received buffer, which goes once the task lets them go.
        ``received_seconds`` is how long it took to come."""
        done = box.pop()
        assert done is not None
        message_id, encoded = done
        del done
        instruction = decode_message(encoded)
        del encoded
        said = statement(instruction)  # before the app has the model, which nothing in it can then restate
        context = Context(self._name, self._data, self._state, received_seconds)
        reply = stated(self._app(instruction, context), said)
        parts = message_parts(reply)
        self._offered[message_id] = parts
        size = sum(memoryview(part).nbytes for part in parts)
        outbox.put(fleet_pb2.ClientFrame(offer=fleet_pb2.Offer(message_id=message_id, size=size)))
        self.answered += 1


def _read(frames: Iterator[_ServerFrame], inbox: _Inbox, urgent: queue.Queue[fleet_pb2.ClientFrame]) -> None:
    """Read the stream after the welcome, in a thread of its own: answer each ``Ping`` at once and pass every
    other frame to the session in ``inbox``, then ``None`` when the stream ends (or the error that ended it).

    The session's thread runs the task, which may train for minutes; this one goes on reading meanwhile, so the
    server learns that the site is alive (see ``fleet.proto``) however busy it is."""
    end: grpc.RpcError | None = None
    try:
        for frame in frames:
            if isinstance(frame, fleet_pb2.ServerFrame) and frame.WhichOneof("frame") == "ping":
                urgent.put(fleet_pb2.ClientFrame(pong=fleet_pb2.Pong(nonce=frame.ping.nonce)))
                continue
            inbox.put(frame)
    except grpc.RpcError as exc:
        end = exc
    finally:
        inbox.put(end)  # whatever ended the stream, the session must not wait for more


def _kind(frame: fleet_pb2.ServerFrame | Chunk) -> str | None:
    """Which frame ``frame`` is (``"welcome"``, ``"chunk"``...)."""
    return "chunk" if isinstance(frame, Chunk) else frame.WhichOneof("frame")


def _connect_failure(channel: grpc.Channel, timeout: float) -> str | None:
    """``None`` once ``channel`` is connected (waiting at most ``timeout`` seconds), else gRPC's account of why
    it is not: a call that does not wait for the connection fails at once with the last connection error."""
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        return None
    except grpc.FutureTimeoutError:
        pass
    try:
        next(connect_call(channel)(iter(()), timeout=timeout, wait_for_ready=False), None)
    except grpc.RpcError as exc:
        return _describe(exc)
    return None  # connected after all; the server ends a stream that sends no Hello


def _tls_mismatch(
    failure: str, server: str, *, tls: bool, explain: Callable[[str], str | None] | None = None
) -> str | None:
    """The likely cause of a failed connection when it looks like the two ends disagree about TLS, else ``None``.

    Refused, unreachable or timed-out connections are not mismatches; a handshake that fails, or a server that
    closes the socket as soon as it is open, are. ``explain`` (see :func:`run_client`) is asked first: a
    certificate that has expired, or that this site's clock finds not valid yet, fails a handshake just as a
    certificate from another CA does."""
    text = failure.lower()
    if "wrong_version_number" in text:
        return (
            f"TLS handshake with the server at {server} failed: it does not speak TLS "
            "(if it runs with --insecure, connect with --insecure too)"
        )
    handshake = any(words in text for words in ("handshake", "ssl", "tls", "certificate", "peer name"))
    hung_up = "socket closed" in text or "connection reset" in text
    cause = explain(failure) if tls and explain is not None and (handshake or hung_up) else None
    if cause is not None:
        return f"TLS handshake with the server at {server} failed: {cause}"
    if "certificate has expired" in text or "certificate is not yet valid" in text:
        return (
            f"TLS handshake with the server at {server} failed: a certificate is outside its validity period "
            f"(is this machine's clock right?): {failure}"
        )
    if "certificate_verify_failed" in text or "peer name" in text or "hostname verification" in text:
        return (
            f"TLS handshake with the server at {server} failed: its certificate is not signed by the CA given "
            "with --ca, or does not name the host in --server (is it the federation's ca.pem?)"
        )
    if "handshake" in text or "ssl" in text or "tls" in text:
        return f"TLS handshake with the server at {server} failed: {failure}"
    if "socket closed" in text or "connection reset" in text:
        if tls:
            return (
                f"the server at {server} closed the connection during the TLS handshake: it probably requires a "
                "client certificate signed by its CA (pass --cert and --key)"
            )
        return (
            f"the server at {server} closed the connection: it probably requires TLS "
            "(pass --ca with the federation's ca.pem instead of --insecure)"
        )
    return None


def _describe(error: grpc.RpcError) -> str:
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    parts = [str(code().name) if callable(code) else "", str(details()) if callable(details) else ""]
    return ": ".join(p for p in parts if p) or "the stream failed"
