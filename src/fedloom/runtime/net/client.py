"""The client agent of a deployment: dial out to the server, then answer its instructions until it says bye.

The agent opens one ``Connect`` stream (see ``fleet.proto``), introduces itself by name, and then, for every
instruction the server sends, runs :func:`fedloom.runtime.client.handle_instruction` on the task and this
site's own data and sends the encoded reply back under the instruction's message id. The same code as in
simulation computes the reply; only the transport differs.

If the task raises, the agent logs the error with its traceback and sends nothing for that instruction: the
server counts the client as dropped for that round (after the round's deadline) and the agent stays
connected for the next instruction. The agent does not reconnect after the connection is lost (not yet): it
raises :class:`~fedloom.core.errors.TransportError`.

gRPC reaches the server through the proxy in ``https_proxy``/``http_proxy`` (or ``grpc_proxy``) where one is
set, unless the server's host is listed in ``no_proxy``.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterator

import grpc

from fedloom.core.codec import decode_message, encode_message
from fedloom.core.errors import DecodeError, TransportError
from fedloom.data.base import ClientData
from fedloom.runtime.client import handle_instruction
from fedloom.runtime.net import fleet_pb2, fleet_pb2_grpc
from fedloom.runtime.net.frames import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Reassembler,
    check_protocol_version,
    split_message,
)
from fedloom.runtime.net.server import GRPC_OPTIONS, parse_address
from fedloom.task.base import Task

__all__ = ["run_client"]

log = logging.getLogger("fedloom.client")


def run_client(
    task: Task,
    data: ClientData,
    *,
    server: str,
    name: str,
    connect_attempts: int = 5,
    connect_timeout: float = 2.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    credentials: grpc.ChannelCredentials | None = None,
) -> int:
    """Serve as client ``name`` of the federation at ``server`` (``HOST:PORT``) until it says bye, and return
    how many instructions were answered.

    With ``credentials`` (see :func:`fedloom.runtime.net.tls.channel_credentials`) the connection is TLS, and
    the server's certificate must name the host in ``server``; without them it is plaintext (with a warning).
    The first connection is tried ``connect_attempts`` times, each waiting up to ``connect_timeout`` seconds
    and the waits between them doubling from 0.5 s; a TLS mismatch (wrong CA, one side without TLS, a missing
    client certificate) ends the tries at once. Raises :class:`~fedloom.core.errors.ConfigError` for a
    malformed address; :class:`TransportError` when the server cannot be reached after those attempts, a TLS
    mismatch (naming its likely cause), when the server refuses this client, or goes away before saying bye;
    :class:`DecodeError` when it sends malformed frames.
    """
    parse_address(server)
    if credentials is None:
        channel = grpc.insecure_channel(server, options=GRPC_OPTIONS)
    else:
        channel = grpc.secure_channel(server, credentials, options=GRPC_OPTIONS)
    with channel:
        _wait_until_reachable(channel, server, connect_attempts, connect_timeout, tls=credentials is not None)
        if credentials is None:
            log.warning("connected to %s without TLS: traffic is unencrypted", server)
        outbox: queue.Queue[fleet_pb2.ClientFrame | None] = queue.Queue()
        outbox.put(fleet_pb2.ClientFrame(hello=fleet_pb2.Hello(protocol_version=PROTOCOL_VERSION, client_name=name)))
        stub = fleet_pb2_grpc.FleetStub(channel)  # type: ignore[no-untyped-call]  # generated code, untyped
        frames = stub.Connect(_drain(outbox))
        try:
            return _serve(task, data, frames, outbox, server, name, chunk_size, max_message_bytes)
        except grpc.RpcError as exc:
            raise TransportError(f"lost the connection to the server at {server}: {_describe(exc)}") from None
        finally:
            outbox.put(None)
            frames.cancel()


def _wait_until_reachable(channel: grpc.Channel, server: str, attempts: int, timeout: float, *, tls: bool) -> None:
    pause = 0.5
    for attempt in range(1, attempts + 1):
        failure = _connect_failure(channel, timeout)
        if failure is None:
            return
        mismatch = _tls_mismatch(failure, server, tls=tls)
        if mismatch is not None:
            raise TransportError(mismatch)
        log.info("server %s not reachable (attempt %d of %d): %s", server, attempt, attempts, failure)
        if attempt < attempts:
            time.sleep(pause)
            pause *= 2
    raise TransportError(f"cannot reach the server at {server} after {attempts} attempts")


def _connect_failure(channel: grpc.Channel, timeout: float) -> str | None:
    """``None`` once ``channel`` is connected (waiting at most ``timeout`` seconds), else gRPC's account of why
    it is not: a call that does not wait for the connection fails at once with the last connection error."""
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        return None
    except grpc.FutureTimeoutError:
        pass
    stub = fleet_pb2_grpc.FleetStub(channel)  # type: ignore[no-untyped-call]  # generated code, untyped
    try:
        next(stub.Connect(iter(()), timeout=timeout, wait_for_ready=False), None)
    except grpc.RpcError as exc:
        return _describe(exc)
    return None  # connected after all; the server ends a stream that sends no Hello


def _tls_mismatch(failure: str, server: str, *, tls: bool) -> str | None:
    """The likely cause of a failed connection when it looks like the two ends disagree about TLS, else ``None``.

    Refused, unreachable or timed-out connections are not mismatches; a handshake that fails, or a server that
    closes the socket as soon as it is open, are."""
    text = failure.lower()
    if "wrong_version_number" in text:
        return (
            f"TLS handshake with the server at {server} failed: it does not speak TLS "
            "(if it runs with --insecure, connect with --insecure too)"
        )
    if "certificate_verify_failed" in text or "peer name" in text:
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


def _drain(outbox: queue.Queue[fleet_pb2.ClientFrame | None]) -> Iterator[fleet_pb2.ClientFrame]:
    """The frames to send, as gRPC's request iterator wants them; ``None`` in the queue ends the stream."""
    while (frame := outbox.get()) is not None:
        yield frame


def _serve(
    task: Task,
    data: ClientData,
    frames: Iterator[fleet_pb2.ServerFrame],
    outbox: queue.Queue[fleet_pb2.ClientFrame | None],
    server: str,
    name: str,
    chunk_size: int,
    max_message_bytes: int,
) -> int:
    greeting = next(frames, None)
    kind = None if greeting is None else greeting.WhichOneof("frame")
    if greeting is None or kind == "refusal":
        reason = "it closed the stream" if greeting is None else greeting.refusal.reason
        raise TransportError(f"the server at {server} refused client {name!r}: {reason}")
    if kind != "welcome":
        raise DecodeError(f"the server at {server} opened with a {kind} frame instead of a Welcome")
    check_protocol_version(greeting.welcome.protocol_version, f"the server at {server}")
    reassembler = Reassembler(max_message_bytes)
    answered = 0
    for frame in frames:
        kind = frame.WhichOneof("frame")
        if kind == "bye":
            log.info("the server said bye after %d instructions", answered)
            return answered
        if kind == "refusal":
            raise TransportError(f"the server at {server} ended the session of {name!r}: {frame.refusal.reason}")
        if kind != "chunk":
            raise DecodeError(f"the server at {server} sent an unexpected {kind} frame")
        done = reassembler.feed(frame.chunk)
        if done is None:
            continue
        message_id, encoded = done
        instruction = decode_message(encoded)
        try:
            reply = handle_instruction(task, data, instruction)
        except Exception:
            # Sending nothing makes the server count this client as dropped for the round; see the module's doc.
            log.exception("the task failed on the %s instruction %d; sending no reply", instruction.kind, message_id)
            continue
        for chunk in split_message(message_id, encode_message(reply), chunk_size):
            outbox.put(fleet_pb2.ClientFrame(chunk=chunk))
        answered += 1
    raise TransportError(f"the server at {server} closed the connection without saying bye")


def _describe(error: grpc.RpcError) -> str:
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    parts = [str(code().name) if callable(code) else "", str(details()) if callable(details) else ""]
    return ": ".join(p for p in parts if p) or "the stream failed"
