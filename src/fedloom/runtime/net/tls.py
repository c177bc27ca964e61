"""TLS for a federation: a private CA, the server's certificate, client certificates, and gRPC credentials.

``fedloom certs init`` calls :func:`init_certs`, which writes into one folder (``fedloom certs issue``, with
:func:`issue_certs`, adds client certificates or a new server certificate signed by the same CA later)::

    ca.pem  ca.key                  the federation's CA (keep ca.key offline; sites get only ca.pem)
    server.pem  server.key          the server's certificate, for the hosts clients dial (DNS names, IPs)
    clients/NAME.pem  NAME.key      optional client certificates, for mutual TLS

Keys are ECDSA P-256 (what gRPC's BoringSSL accepts everywhere). Certificates are valid from five minutes ago
(for clocks that differ a little) for :data:`CA_DAYS` (the CA) or :data:`LEAF_DAYS` days. Every file is written
atomically (temporary file, fsync, rename); private keys have mode 0600. :func:`fingerprint` names a CA in an
invitation, so a site can check the ``ca.pem`` it was given.

>>> written = init_certs("certs", hosts=["fl.example.org", "10.0.0.5"])      # doctest: +SKIP
>>> fingerprint(Path("certs/ca.pem").read_bytes())                           # doctest: +SKIP
'sha256:4f1c...'
"""

from __future__ import annotations

import _ssl
import contextlib
import datetime as dt
import hashlib
import ipaddress
import os
import re
import socket
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedloom.core.errors import ConfigError, TransportError
from fedloom.core.validation import check_client_name
from fedloom.runtime.net.options import parse_address

if TYPE_CHECKING:
    import grpc

__all__ = [
    "CA_DAYS",
    "LEAF_DAYS",
    "channel_credentials",
    "fetch_ca",
    "fingerprint",
    "init_certs",
    "issue_certs",
    "server_chain",
    "server_credentials",
]

CA_DAYS = 3650
LEAF_DAYS = 825  # the longest validity that common TLS clients accept for a server certificate
_SKEW = dt.timedelta(minutes=5)
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class _Issued:
    """A certificate and its private key, as PEM."""

    cert_pem: bytes
    key_pem: bytes
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def fingerprint(cert_pem: bytes) -> str:
    """``"sha256:<hex>"``: the SHA-256 of the certificate's DER encoding (the first one in ``cert_pem``).

    Raises :class:`ConfigError` if ``cert_pem`` holds no PEM certificate."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate: {exc}") from None
    return _fingerprint(cert)


def _fingerprint(cert: x509.Certificate) -> str:
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _subject_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """The subjectAltName entries for ``hosts``: IP addresses as such, everything else as a DNS name.

    Raises :class:`ConfigError` for an empty list or a host that is neither an IP address nor a DNS name."""
    if not hosts:
        raise ConfigError("give at least one --host: the name or address that clients dial to reach the server")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
            continue
        except ValueError:
            pass
        labels = host.removesuffix(".").split(".")
        if len(host) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
            raise ConfigError(f"host {host!r} is neither an IP address nor a DNS name")
        names.append(x509.DNSName(host.removesuffix(".").lower()))
    return list(dict.fromkeys(names))  # without repeats, in order


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _issue(
    subject: str,
    days: int,
    extensions: Sequence[tuple[x509.ExtensionType, bool]],
    issuer: _Issued | None,
) -> _Issued:
    """A certificate for a fresh key, signed by ``issuer`` (or by itself when ``issuer`` is ``None``)."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.timezone.utc)
    signer = key if issuer is None else issuer.key
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if issuer is None else issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    cert = builder.sign(signer, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return _Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem, cert, key)


def _usage(*, signing: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not signing,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signing,
        crl_sign=signing,
        encipher_only=False,
        decipher_only=False,
    )


def _make_ca(federation: str) -> _Issued:
    return _issue(
        f"fedloom CA {federation}",
        CA_DAYS,
        [(x509.BasicConstraints(ca=True, path_length=0), True), (_usage(signing=True), True)],
        None,
    )


def _make_leaf(ca: _Issued, subject: str, purpose: x509.ObjectIdentifier, alt: list[x509.GeneralName]) -> _Issued:
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_usage(signing=False), True),
        (x509.ExtendedKeyUsage([purpose]), False),
    ]
    if alt:
        extensions.append((x509.SubjectAlternativeName(alt), False))
    return _issue(subject, LEAF_DAYS, extensions, ca)


def init_certs(
    out: str | os.PathLike[str],
    hosts: Sequence[str],
    clients: Sequence[str] = (),
    *,
    force: bool = False,
) -> list[Path]:
    """Make a federation's CA, its server certificate for ``hosts`` and a certificate per name in ``clients``,
    and write them under ``out`` (see the module's doc); return the paths written, in order.

    Raises :class:`ConfigError` for a bad host or client name, and when any file to write exists already
    (unless ``force``): then nothing is written.
    """
    folder = Path(out)
    alt = _subject_names(hosts)
    _check_clients(clients)
    ca = _make_ca(str(alt[0].value))
    files: dict[Path, tuple[bytes, bool]] = {  # path -> (content, private)
        folder / "ca.pem": (ca.cert_pem, False),
        folder / "ca.key": (ca.key_pem, True),
        **_server_files(folder, ca, alt),
        **_client_files(folder, ca, clients),
    }
    existing = [str(path) for path in files if path.exists()]
    if existing and not force:
        verb = "exists" if len(existing) == 1 else "exist"
        raise ConfigError(
            f"{', '.join(existing)} {verb} already; pass --force to replace the federation's certificates"
        )
    return _write_all(files)


def issue_certs(
    out: str | os.PathLike[str], hosts: Sequence[str] = (), clients: Sequence[str] = (), *, force: bool = False
) -> list[Path]:
    """With the CA that :func:`init_certs` made in ``out`` (``ca.pem``, ``ca.key``): a new server certificate
    for ``hosts`` (all the hosts clients dial: it replaces the old one) if any are given, and a certificate per
    name in ``clients``; return the paths written. The CA, and so its fingerprint, stay as they are: sites keep
    working, and a new site or a new server address needs no new CA.

    Raises :class:`ConfigError` when neither hosts nor clients are given, for a bad host or client name, when
    ``out`` holds no CA (or its key does not match it), and when a client's files exist already (unless
    ``force``): then nothing is written.
    """
    if not hosts and not clients:
        raise ConfigError("give --host (a new server certificate) or --client (a certificate for a site), or both")
    folder = Path(out)
    alt = _subject_names(hosts) if hosts else []
    _check_clients(clients)
    ca = _load_issuer(folder)
    files = {**(_server_files(folder, ca, alt) if alt else {}), **_client_files(folder, ca, clients)}
    existing = [str(path) for path in files if path.exists() and path.parent.name == "clients"]
    if existing and not force:
        verb = "exists" if len(existing) == 1 else "exist"
        raise ConfigError(f"{', '.join(existing)} {verb} already; pass --force to replace them")
    return _write_all(files)


def _check_clients(clients: Sequence[str]) -> None:
    for client in clients:
        check_client_name(client)
    if len(set(clients)) != len(clients):
        raise ConfigError("each --client name may be given once")


def _server_files(folder: Path, ca: _Issued, alt: list[x509.GeneralName]) -> dict[Path, tuple[bytes, bool]]:
    server = _make_leaf(ca, str(alt[0].value), ExtendedKeyUsageOID.SERVER_AUTH, alt)
    return {folder / "server.pem": (server.cert_pem, False), folder / "server.key": (server.key_pem, True)}


def _client_files(folder: Path, ca: _Issued, clients: Sequence[str]) -> dict[Path, tuple[bytes, bool]]:
    files = {}
    for client in clients:
        issued = _make_leaf(ca, client, ExtendedKeyUsageOID.CLIENT_AUTH, [])
        files[folder / "clients" / f"{client}.pem"] = (issued.cert_pem, False)
        files[folder / "clients" / f"{client}.key"] = (issued.key_pem, True)
    return files


def _load_issuer(folder: Path) -> _Issued:
    """The CA in ``folder`` (``ca.pem`` and its key ``ca.key``), to sign with; :class:`ConfigError` if absent."""
    cert_path, key_path = folder / "ca.pem", folder / "ca.key"
    if not cert_path.is_file() or not key_path.is_file():
        raise ConfigError(f"{folder} holds no CA (ca.pem, ca.key); make one with `fedloom certs init --out {folder}`")
    cert_pem, key_pem = _read(cert_path, "the CA certificate"), _read(key_path, "the CA key")
    _check_pair(cert_pem, key_pem, cert_path, key_path)
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path} is not an ECDSA key as fedloom makes")
    return _Issued(cert_pem, key_pem, x509.load_pem_x509_certificate(cert_pem), key)


def _write_all(files: dict[Path, tuple[bytes, bool]]) -> list[Path]:
    for path, (content, private) in files.items():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, content, 0o600 if private else 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    return list(files)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` through a temporary file (created with mode 0600, so a key is never readable by
    others, not even for a moment), fsync it, set ``mode``, rename it over ``path``, fsync the folder."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _load_ca(path: Path) -> bytes:
    ca_pem = _read(path, "the CA certificate")
    try:
        x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise ConfigError(f"{path} is not a PEM certificate") from None
    return ca_pem


def _check_pair(cert_pem: bytes, key_pem: bytes, cert_path: Path, key_path: Path) -> None:
    """Raise :class:`ConfigError` unless the files are a PEM certificate and the PEM private key that matches it
    (gRPC would otherwise fail later with a message that names neither file)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ConfigError(f"{cert_path} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{key_path} is not an unencrypted PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(serialization.Encoding.DER, public) != key.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        raise ConfigError(f"{key_path} is not the private key of {cert_path}")


def server_credentials(certs: str | os.PathLike[str], *, mutual: bool = False) -> grpc.ServerCredentials:
    """gRPC credentials of a server from ``certs/server.pem`` and ``certs/server.key``; with ``mutual``, clients
    must present a certificate signed by ``certs/ca.pem``. Raises :class:`ConfigError` if a file is missing or
    the certificate and key do not belong together."""
    import grpc

    folder = Path(certs)
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    cert_pem, key_pem = _read(cert_path, "the server certificate"), _read(key_path, "the server key")
    _check_pair(cert_pem, key_pem, cert_path, key_path)
    ca_path = folder / "ca.pem"
    ca_pem = _load_ca(ca_path) if mutual or ca_path.is_file() else None
    # The handshake sends the CA after the server's certificate, so that a site with only the CA's fingerprint
    # (an invitation) can take the CA from the server and check it (see fetch_ca).
    chain = cert_pem if ca_pem is None else cert_pem.rstrip(b"\n") + b"\n" + ca_pem
    return grpc.ssl_server_credentials(
        [(key_pem, chain)], root_certificates=ca_pem if mutual else None, require_client_auth=mutual
    )


def fetch_ca(server: str, expected: str, timeout: float = 10.0) -> bytes:
    """The federation's CA certificate (PEM), taken from the TLS handshake of the server at ``server``
    (``HOST:PORT``) and trusted only because its :func:`fingerprint` is ``expected`` and it signed the
    server's certificate: how a site joins with an invitation instead of a ``ca.pem`` file.

    Raises :class:`TransportError` if the server cannot be reached or does not speak TLS, and
    :class:`ConfigError` if no certificate it sends has that fingerprint (the wrong server, or someone in
    between) or that certificate did not sign the server's.
    """

    wanted = expected.strip().lower()
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", wanted):
        raise ConfigError(f"a CA fingerprint is 'sha256:' and 64 hex digits, got {expected!r}")
    try:
        certs = server_chain(server, timeout)
    except ssl.SSLError as exc:  # it answered, but not as a TLS server: trying again will not help
        raise ConfigError(
            f"cannot fetch the CA from the server at {server}: the TLS handshake failed ({exc.reason or exc}); "
            "if it runs with --insecure, connect with --insecure too"
        ) from None
    except OSError as exc:
        raise TransportError(f"cannot fetch the CA from the server at {server}: {exc}") from None
    matching = [cert for cert in certs if _fingerprint(cert) == wanted]
    if not matching:
        raise ConfigError(
            f"the server at {server} sent no certificate with fingerprint {wanted}: is it the federation's "
            "server, and is that the fingerprint of its invitation?"
        )
    ca = matching[0]
    try:
        certs[0].verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(
            f"the CA with fingerprint {wanted} did not sign the certificate of the server at {server}"
        ) from None
    return ca.public_bytes(serialization.Encoding.PEM)


def server_chain(server: str, timeout: float = 10.0) -> list[x509.Certificate]:
    """The certificates that the TLS server at ``server`` (``HOST:PORT``) sends in its handshake, its own first,
    checked against nothing: for :func:`fetch_ca` to compare with a fingerprint, and to read their dates when a
    handshake fails (:mod:`fedloom.runtime.net.validity`). Raises :class:`ConfigError` for a malformed address,
    ``ssl.SSLError`` when the server does not speak TLS, ``OSError`` when it cannot be reached."""
    host, port = parse_address(server)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # nothing is trusted here: the caller decides what to make of them
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        chain = _unverified_chain(tls)
    return [x509.load_der_x509_certificate(der) for der in chain]


def _unverified_chain(tls: ssl.SSLSocket) -> list[bytes]:
    """The certificates the peer sent, as DER, its own first (``SSLSocket.get_unverified_chain`` from Python
    3.13; the same method of the underlying ``_ssl`` object before)."""
    public = getattr(tls, "get_unverified_chain", None)
    if public is not None:
        return [bytes(der) for der in public()]
    certs = tls._sslobj.get_unverified_chain()  # type: ignore[attr-defined]  # Python 3.10 to 3.12
    return [cert.public_bytes(_ssl.ENCODING_DER) for cert in certs or []]


def channel_credentials(
    ca: str | os.PathLike[str] | bytes,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials:
    """gRPC credentials of a client that trusts only the CA ``ca`` (a ``ca.pem`` path, or the PEM itself as
    :func:`fetch_ca` returns it) and, for mutual TLS, presents the certificate ``cert`` with its private key
    ``key`` (both or neither). Raises :class:`ConfigError` if a file is missing or not what it should be."""
    import grpc

    ca_pem = ca if isinstance(ca, bytes) else _load_ca(Path(ca))
    if (cert is None) != (key is None):
        raise ConfigError("--cert and --key go together: give both for mutual TLS, or neither")
    if cert is None or key is None:
        return grpc.ssl_channel_credentials(root_certificates=ca_pem)
    cert_path, key_path = Path(cert), Path(key)
    cert_pem, key_pem = _read(cert_path, "the client certificate"), _read(key_path, "the client key")
    _check_pair(cert_pem, key_pem, cert_path, key_path)
    return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem)
