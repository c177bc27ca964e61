"""Certificates outside their validity period: what a failed TLS handshake means when a date is the cause.

gRPC says little about why a handshake failed: a client that refuses the server's certificate hears "certificate
verify failed" whether the CA is another federation's or the certificate has expired, and a client whose own
certificate a mutual-TLS server refuses sees only the socket close. So when a handshake fails, a site reads the
dates of the certificates involved (with ``cryptography``) and names the one that is not valid by its clock,
with its validity period and the clock's reading (:func:`handshake_cause`): the server's certificate and its CA
(as the server sends them, checked against nothing: only their dates are read), the CA file given with
``--ca``, and the site's own certificate (``--cert``). A server reads the dates of its own certificate, its CA
and the client certificates in its certificates folder when it starts (:func:`dated_certificates`): gRPC tells
it nothing of the handshakes that fail.

>>> handshake_cause("... CERTIFICATE_VERIFY_FAILED", "fl.example.org:7500", ca="ca.pem")  # doctest: +SKIP
"the server's certificate (fl.example.org) has expired: it is valid from 2024-01-02 10:00:00 UTC to ..."
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from fedloom.core.errors import ConfigError
from fedloom.runtime.net.tls import server_chain

__all__ = ["dated_certificates", "handshake_cause", "out_of_period"]

#: What gRPC says when the peer ended the handshake: under mutual TLS, a server that refused this site's certificate.
_HUNG_UP = ("socket closed", "connection reset", "alert", "handshake")
#: What gRPC says when this site refused the server's certificate (then the server never saw this site's).
_REFUSED_SERVER = ("certificate_verify_failed", "peer name", "hostname verification")


def _when(moment: dt.datetime) -> str:
    return f"{moment.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC"


def out_of_period(cert: x509.Certificate, now: dt.datetime | None = None) -> str | None:
    """``None`` while ``cert`` is valid at ``now`` (this machine's clock by default), else what is wrong, as the
    end of a sentence that names the certificate: ``"has expired: it is valid from A to B, and this machine's
    clock says C"`` (or ``"is not valid yet: ..."``)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if start <= now <= end:
        return None
    state = "has expired" if now > end else "is not valid yet"
    return f"{state}: it is valid from {_when(start)} to {_when(end)}, and this machine's clock says {_when(now)}"


def _advice(problem: str, renew: str) -> str:
    """What to do: set the clock right, or (an expired certificate, the clock right) ``renew``."""
    if problem.startswith("has expired"):
        return f"if this machine's clock is right, {renew}"
    return "is this machine's clock right (or was the certificate made on a machine whose clock is ahead)?"


def _name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def _load(source: str | os.PathLike[str] | bytes) -> x509.Certificate | None:
    """The first certificate of a PEM file (or of PEM bytes); ``None`` if it cannot be read (that is said
    elsewhere: the credentials are made from the same files)."""
    try:
        pem = source if isinstance(source, bytes) else Path(source).read_bytes()
        return x509.load_pem_x509_certificate(pem)
    except (OSError, ValueError):
        return None


def handshake_cause(
    failure: str,
    server: str,
    *,
    ca: str | os.PathLike[str] | bytes | None = None,
    cert: str | os.PathLike[str] | None = None,
    now: dt.datetime | None = None,
    timeout: float = 5.0,
) -> str | None:
    """Why a TLS handshake with ``server`` (``HOST:PORT``) failed, when a certificate is the cause that gRPC's
    account ``failure`` does not name; ``None`` when none of these is:

    - a certificate outside its validity period at ``now`` (this machine's clock), in the order the handshake
      checks them: the server's own and its CA (taken from a handshake of their own, checked against nothing),
      the CA this site trusts (``ca``: a ``ca.pem`` path or the PEM), this site's certificate (``cert``);
    - under mutual TLS (``cert`` given), a server that ended the handshake although every date is right: it did
      not accept this site's certificate.

    The answer is a sentence to follow ``"TLS handshake with the server at HOST:PORT failed: "``; it names the
    certificate, its validity period and the clock, and says what to do. Never raises for a server that
    cannot be reached or a file that cannot be read: those dates are then left unread."""
    now = now or dt.datetime.now(dt.timezone.utc)
    try:
        sent = server_chain(server, timeout)
    except (OSError, ssl.SSLError, ConfigError, ValueError):
        sent = []
    for position, sent_cert in enumerate(sent):
        problem = out_of_period(sent_cert, now)
        if problem is None:
            continue
        if position == 0:
            renew = "the server needs a new certificate (`fedloom certs issue --host HOST`, where its CA is kept)"
            return f"the server's certificate ({_name(sent_cert)}) {problem}; {_advice(problem, renew)}"
        renew = "the federation needs a new CA (`fedloom certs init --force`) and every site its ca.pem"
        return f"the CA that the server sends ({_name(sent_cert)}) {problem}; {_advice(problem, renew)}"
    trusted = None if ca is None else _load(ca)
    problem = None if trusted is None else out_of_period(trusted, now)
    if problem is not None:
        shown = "the CA given with --ca" if isinstance(ca, bytes) else f"the CA given with --ca ({ca})"
        renew = "get the federation's current ca.pem"
        return f"{shown} {problem}; {_advice(problem, renew)}"
    if cert is None:
        return None
    own = _load(cert)
    if own is None:
        return None
    problem = out_of_period(own, now)
    if problem is not None:
        renew = f"ask for a new one (`fedloom certs issue --client {_name(own)} --force`, where the CA is kept)"
        return f"this site's certificate {cert} (--cert) {problem}; {_advice(problem, renew)}"
    text = failure.lower()
    if not any(words in text for words in _REFUSED_SERVER) and any(words in text for words in _HUNG_UP):
        return (
            f"the server did not accept this site's certificate {cert} (--cert), which is valid by this machine's "
            f"clock until {_when(own.not_valid_after_utc)}: was it made by this federation's CA (and is the "
            "server's clock right)?"
        )
    return None


def dated_certificates(certs: str | os.PathLike[str], *, mutual: bool, now: dt.datetime | None = None) -> list[str]:
    """What a server should warn about when it starts with the certificates folder ``certs`` (as ``fedloom
    certs init`` writes it): one line for each of its certificate (``server.pem``), its CA (``ca.pem``) and,
    with ``mutual``, the client certificates in ``clients/`` that are outside their validity period at ``now``
    (this machine's clock). Files that cannot be read are left out (the credentials say so)."""
    folder = Path(certs)
    now = now or dt.datetime.now(dt.timezone.utc)
    lines: list[str] = []
    own = [
        (folder / "server.pem", "the server's certificate", f"fedloom certs issue --out {folder} --host HOST"),
        (folder / "ca.pem", "the federation's CA", f"fedloom certs init --out {folder} --host HOST --force"),
    ]
    for path, what, command in own:
        cert = _load(path) if path.is_file() else None
        problem = None if cert is None else out_of_period(cert, now)
        if problem is not None:
            renew = f"make a new one (`{command}`)"
            lines.append(f"{what} {path} {problem}; sites refuse it: {_advice(problem, renew)}")
    clients = sorted((folder / "clients").glob("*.pem")) if mutual else []
    for path in clients:
        cert = _load(path)
        problem = None if cert is None else out_of_period(cert, now)
        if problem is not None:
            renew = f"make it a new one (`fedloom certs issue --out {folder} --client {path.stem} --force`)"
            lines.append(
                f"the certificate of site {path.stem} ({path}) {problem}; this server refuses it under mutual TLS: "
                f"{_advice(problem, renew)}"
            )
    return lines
