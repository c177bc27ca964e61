"""Certificates outside their validity period, on 127.0.0.1: the site's one-line error names the certificate, its
dates and the local clock, and the server warns when it starts.

The certificates are made here with ``cryptography``, signed by the CA of ``fedloom certs init``, with validity
periods wholly in the past or in the future: the clocks are left as they are. The processes run as in
``test_deployment.py``.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from test_deployment import Done, Processes, free_port

from fedloom.core.errors import TransportError
from fedloom.data.base import ArrayData, ClientData
from fedloom.data.clientfile import save_client_data
from fedloom.runtime.net.client import run_client
from fedloom.runtime.net.server import FleetServer
from fedloom.runtime.net.tls import channel_credentials, init_certs, server_credentials
from fedloom.runtime.net.validity import dated_certificates, handshake_cause, out_of_period
from fedloom.tracking.tokens import TokenStore

# Servers and clients run as fedloom processes talking gRPC over TLS on loopback.
pytestmark = pytest.mark.integration

DAY = dt.timedelta(days=1)
DATES = r"it is valid from \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC to \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, and this machine's clock says \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"  # noqa: E501


def sign(ca_dir: Path, name: str, start: dt.datetime, end: dt.datetime, *, server: bool) -> tuple[bytes, bytes]:
    """A certificate (PEM) for a fresh key (PEM), valid from ``start`` to ``end``, signed by the CA in ``ca_dir``:
    a server's for 127.0.0.1, or a client's named ``name``."""
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    purpose = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
    )
    if server:
        alt = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        builder = builder.add_extension(alt, critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def server_folder(procs: Processes, name: str, start: dt.datetime, end: dt.datetime) -> str:
    """A certificates folder ``name`` with the federation's CA and a server certificate valid from ``start`` to
    ``end``."""
    folder = procs.cwd / name
    folder.mkdir()
    shutil.copy(procs.cwd / "certs" / "ca.pem", folder / "ca.pem")
    cert, key = sign(procs.cwd / "certs", "127.0.0.1", start, end, server=True)
    (folder / "server.pem").write_bytes(cert)
    (folder / "server.key").write_bytes(key)
    return name


@dataclass(frozen=True)
class Tried:
    """Each server, and the client that tried it."""

    expired_server: Done
    expired_client: Done
    mutual_server: Done
    late_site: Done


@pytest.fixture(scope="module")
def tried(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tried]:
    procs = Processes(tmp_path_factory.mktemp("dates"))
    try:
        yield try_servers(procs)
    finally:
        procs.close()


def _wait_for_output(procs: Processes, handle: int, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in procs.output(handle):
        assert procs.running(handle), procs.wait(handle, timeout=1)
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s"
        time.sleep(0.05)


def try_servers(procs: Processes) -> Tried:
    """Two servers at once: one whose certificate expired yesterday, and one with mutual TLS whose certificates
    are right; once they listen, a site dials each, the second presenting a client certificate that expired
    yesterday (kept in the server's ``certs/clients``, as `certs issue` does)."""
    # In this process, for speed: no site gets as far as training, so two rows of data do.
    rows = ArrayData(np.zeros((2, 64), np.float32), np.array([0, 1]))
    save_client_data(procs.cwd / "site.npz", ClientData(rows, rows))
    init_certs(procs.cwd / "certs", ["127.0.0.1"])
    now = dt.datetime.now(dt.timezone.utc)
    late_cert, late_key = sign(procs.cwd / "certs", "late", now - 30 * DAY, now - DAY, server=False)
    (procs.cwd / "certs" / "clients").mkdir(exist_ok=True)
    (procs.cwd / "certs" / "clients" / "late.pem").write_bytes(late_cert)
    (procs.cwd / "certs" / "clients" / "late.key").write_bytes(late_key)
    servers = {
        "expired": (server_folder(procs, "expired", now - 30 * DAY, now - DAY), ()),
        "mutual": ("certs", ("--mutual-tls",)),
    }
    started = {}
    for name, (certs, extra) in servers.items():
        token = TokenStore(procs.cwd / f"run-{name}").create("late")
        address = f"127.0.0.1:{free_port()}"
        server = procs.start(
            *("server", "digits", "--address", address, "--rounds", "1", "--min-clients", "1"),
            *("--run-dir", f"run-{name}", "--certs", certs, *extra, "--join-timeout", "60"),
        )
        started[name] = (server, address, token, extra)
    handles = {}
    for name, (server, address, token, extra) in started.items():
        _wait_for_output(procs, server, "listening on")  # so that the site's first try reaches it
        own = ("--cert", "certs/clients/late.pem", "--key", "certs/clients/late.key") if extra else ()
        client = procs.start(
            *("client", "digits", "--server", address, "--data", "site.npz", "--token", token),
            *("--ca", "certs/ca.pem", *own, "--retry-for", "60"),
        )
        handles[name] = (server, client)
    clients = {name: procs.wait(client, timeout=90) for name, (_server, client) in handles.items()}
    for server, _client in handles.values():
        procs.kill(server)  # each waits for a site that cannot join
    servers_done = {name: procs.wait(server) for name, (server, _client) in handles.items()}
    return Tried(
        expired_server=servers_done["expired"],
        expired_client=clients["expired"],
        mutual_server=servers_done["mutual"],
        late_site=clients["mutual"],
    )


def test_an_expired_server_certificate_is_named_with_its_dates_and_the_clock(tried: Tried):
    error = tried.expired_client.error()
    assert re.fullmatch(
        rf"TLS handshake with the server at 127\.0\.0\.1:\d+ failed: the server's certificate \(127\.0\.0\.1\) has "
        rf"expired: {DATES}; if this machine's clock is right, the server needs a new certificate \(.*\)",
        error,
    ), error
    assert "not signed by the CA" not in error
    warning = rf"WARNING fedloom\.server: the server's certificate expired/server\.pem has expired: {DATES}; "
    assert re.search(warning, tried.expired_server.stderr), tried.expired_server


def test_a_server_certificate_not_valid_yet_asks_about_the_clock(tmp_path: Path):
    """A server (in this process) whose certificate is valid only from tomorrow: the site's error asks about
    the clock, and the server's start-up check says so too."""
    init_certs(tmp_path / "certs", ["127.0.0.1"])
    now = dt.datetime.now(dt.timezone.utc)
    cert, key = sign(tmp_path / "certs", "127.0.0.1", now + DAY, now + 30 * DAY, server=True)
    (tmp_path / "certs" / "server.pem").write_bytes(cert)
    (tmp_path / "certs" / "server.key").write_bytes(key)
    warnings = dated_certificates(tmp_path / "certs", mutual=False)
    assert len(warnings) == 1
    assert warnings[0].startswith(f"the server's certificate {tmp_path / 'certs' / 'server.pem'} is not valid yet: ")
    address = f"127.0.0.1:{free_port()}"
    ca = tmp_path / "certs" / "ca.pem"
    rows = ArrayData(np.zeros((2, 64), np.float32), np.array([0, 1]))
    credentials = server_credentials(tmp_path / "certs")
    with (
        FleetServer(address, authenticate=lambda token: token, credentials=credentials),
        pytest.raises(TransportError) as raised,
    ):
        run_client(
            lambda message, context: message,  # never asked: the handshake fails first
            ClientData(rows, rows),
            server=address,
            token="site",
            retry_for=10,
            credentials=channel_credentials(ca),
            explain=functools.partial(handshake_cause, server=address, ca=ca),
        )
    assert re.fullmatch(
        rf"TLS handshake with the server at {address} failed: the server's certificate \(127\.0\.0\.1\) is "
        rf"not valid yet: {DATES}; is this machine's clock right \(.*\)\?",
        str(raised.value),
    ), raised.value


def test_an_expired_client_certificate_is_named_at_the_site_and_warned_of_by_the_server(tried: Tried):
    error = tried.late_site.error()
    assert re.fullmatch(
        rf"TLS handshake with the server at 127\.0\.0\.1:\d+ failed: this site's certificate "
        rf"certs/clients/late\.pem \(--cert\) has expired: {DATES}; if this machine's clock is right, ask for a "
        r"new one \(.*\)",
        error,
    ), error
    assert "pass --cert and --key" not in error
    warning = (
        rf"WARNING fedloom\.server: the certificate of site late \(certs/clients/late\.pem\) has expired: {DATES}; "
        "this server refuses it under mutual TLS"
    )
    assert re.search(warning, tried.mutual_server.stderr), tried.mutual_server


def test_dates_are_read_without_the_server_and_a_valid_certificate_is_not_blamed(tmp_path: Path):
    """:func:`handshake_cause` reads the site's own files when the server cannot be reached; a certificate within
    its period is blamed only where the server ended the handshake (under mutual TLS)."""
    init_certs(tmp_path, ["127.0.0.1"], ["site"])
    now = dt.datetime.now(dt.timezone.utc)
    own = tmp_path / "clients" / "site.pem"
    nowhere = f"127.0.0.1:{free_port()}"
    assert out_of_period(x509.load_pem_x509_certificate(own.read_bytes()), now) is None
    later = now + 1000 * DAY  # past the certificate's end, by this "clock"
    cause = handshake_cause("Socket closed", nowhere, ca=tmp_path / "ca.pem", cert=own, now=later)
    assert cause is not None
    assert cause.startswith(f"this site's certificate {own} (--cert) has expired: ")
    assert handshake_cause("CERTIFICATE_VERIFY_FAILED", nowhere, ca=tmp_path / "ca.pem", cert=own, now=now) is None
    refused = handshake_cause("Socket closed", nowhere, ca=tmp_path / "ca.pem", cert=own, now=now)
    assert refused is not None
    assert refused.startswith(f"the server did not accept this site's certificate {own}")
