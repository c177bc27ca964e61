"""What both ends of a deployment's gRPC connection agree on: message size limits, heartbeats, addresses.

The server (:mod:`fedloom.runtime.net.server`) and the client agent (:mod:`fedloom.runtime.net.client`) both
import this module, so that neither imports the other.
"""

from __future__ import annotations

from fedloom.core.errors import ConfigError
from fedloom.runtime.net.frames import GRPC_FRAME_LIMIT

__all__ = ["GRPC_OPTIONS", "keepalive_options", "parse_address"]

GRPC_OPTIONS = (
    ("grpc.max_receive_message_length", GRPC_FRAME_LIMIT),
    ("grpc.max_send_message_length", GRPC_FRAME_LIMIT),
)


def keepalive_options(heartbeat: float) -> list[tuple[str, int]]:
    """gRPC channel options for heartbeats: an HTTP/2 ping every ``heartbeat`` seconds, the peer taken as gone
    when one is not answered within ``heartbeat`` seconds, pings allowed with no call in flight, and pings
    received as often as once a second (a peer that pings more often is told to go away).

    On a connection with a call in flight, gRPC (1.85) gives up on an unanswered ping after
    ``grpc.http2.ping_timeout_ms`` (60 s unless set), whatever ``grpc.keepalive_timeout_ms`` says: a client
    whose network went dark was found gone after 62 s with a 1 s heartbeat, and after about 2 s with this set,
    as was one frozen (SIGSTOP) while the model was being sent to it (``tests/net/test_deployment.py``)."""
    every = max(1000, int(heartbeat * 1000))
    return [
        ("grpc.keepalive_time_ms", every),
        ("grpc.keepalive_timeout_ms", every),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 1000),
        ("grpc.http2.ping_timeout_ms", every),
    ]


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[IPv6]:PORT``) as ``(host, port)``; :class:`ConfigError` if it is not one."""
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"address {address!r} is not HOST:PORT with a port in 1..65535")
    return host, int(port_text)
