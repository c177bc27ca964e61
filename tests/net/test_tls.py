"""TLS on 127.0.0.1: ``fedloom certs init``, then ``fedloom server --certs`` and ``fedloom client --ca``.

The processes run as in ``test_deployment.py`` (hermetic environment, output to files, bounded waits, killed
in teardown). Certificates name ``127.0.0.1``, the host the clients dial.
"""

from __future__ import annotations

import ipaddress
import shlex
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from test_deployment import Done, Processes, free_port

from fedloom.runtime.net.tls import fingerprint

# Servers and clients run as fedloom processes talking gRPC over TLS on loopback.
pytestmark = pytest.mark.integration

ROUNDS = ("--rounds", "2", "--seed", "5")
SITES = ("client-000", "client-001")


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    runner = Processes(tmp_path_factory.mktemp("tls"))
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def certs(procs: Processes) -> Done:
    """``fedloom certs init`` for 127.0.0.1 with a client certificate per site, and a second, unrelated CA."""
    procs.run("certs", "init", "--out", "other", "--host", "127.0.0.1").ok()
    clients = [arg for site in SITES for arg in ("--client", site)]
    return procs.run("certs", "init", "--out", "certs", "--host", "127.0.0.1", "--host", "localhost", *clients).ok()


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certs_init_writes_a_ca_and_certificates_signed_by_it(certs: Done, procs: Processes):
    folder = procs.cwd / "certs"
    ca, server = _cert(folder / "ca.pem"), _cert(folder / "server.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)
    alt = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert alt.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert alt.get_values_for_type(x509.DNSName) == ["localhost"]
    for site in SITES:
        _cert(folder / "clients" / f"{site}.pem").verify_directly_issued_by(ca)
    keys = [folder / "ca.key", folder / "server.key", *(folder / "clients" / f"{s}.key" for s in SITES)]
    for key in keys:
        serialization.load_pem_private_key(key.read_bytes(), password=None)
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert f"CA fingerprint {fingerprint((folder / 'ca.pem').read_bytes())}" in certs.stdout
    assert f"wrote {Path('certs') / 'server.key'}" in certs.stdout


def test_certs_init_refuses_to_overwrite_without_force_and_bad_hosts(procs: Processes):
    first = procs.run("certs", "init", "--out", "again", "--host", "127.0.0.1").ok()
    ca = (procs.cwd / "again" / "ca.pem").read_bytes()
    refused = procs.run("certs", "init", "--out", "again", "--host", "127.0.0.1").error()
    assert "already; pass --force" in refused
    assert (procs.cwd / "again" / "ca.pem").read_bytes() == ca
    forced = procs.run("certs", "init", "--out", "again", "--host", "127.0.0.1", "--force").ok()
    assert (procs.cwd / "again" / "ca.pem").read_bytes() != ca
    assert forced.stdout.splitlines()[-1] != first.stdout.splitlines()[-1]  # a new CA fingerprint
    bad = procs.run("certs", "init", "--out", "bad", "--host", "not a host").error()
    assert bad == "host 'not a host' is neither an IP address nor a DNS name"
    assert not (procs.cwd / "bad").exists()


def test_certs_issue_signs_new_sites_and_hosts_with_the_same_ca(procs: Processes):
    procs.run("certs", "init", "--out", "grow", "--host", "127.0.0.1", "--client", "client-000").ok()
    folder = procs.cwd / "grow"
    ca_pem = (folder / "ca.pem").read_bytes()
    old_site = (folder / "clients" / "client-000.pem").read_bytes()
    added = procs.run("certs", "issue", "--out", "grow", "--client", "client-001", "--host", "fl.example.org").ok()
    assert f"CA fingerprint {fingerprint(ca_pem)}" in added.stdout  # the same CA: every site keeps working
    assert (folder / "ca.pem").read_bytes() == ca_pem
    assert (folder / "clients" / "client-000.pem").read_bytes() == old_site
    ca = _cert(folder / "ca.pem")
    site = _cert(folder / "clients" / "client-001.pem")
    site.verify_directly_issued_by(ca)
    assert site.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "client-001"
    server = _cert(folder / "server.pem")
    server.verify_directly_issued_by(ca)
    alt = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert alt.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert stat.S_IMODE((folder / "clients" / "client-001.key").stat().st_mode) == 0o600
    again = procs.run("certs", "issue", "--out", "grow", "--client", "client-001").error()
    assert again.endswith("client-001.key exist already; pass --force to replace them")
    assert procs.run("certs", "issue", "--out", "grow").error().startswith("give --host")
    nothing = procs.run("certs", "issue", "--out", "empty", "--client", "client-002").error()
    assert nothing == "empty holds no CA (ca.pem, ca.key); make one with `fedloom certs init --out empty`"


@pytest.fixture(scope="module")
def parts(procs: Processes) -> Path:
    """Two sites' data, as in the simulation with the same seed."""
    procs.run("partition", "digits", "--clients", "2", "--seed", "5", "--out", "parts").ok()
    return procs.cwd / "parts"


@dataclass(frozen=True)
class Runs:
    simulation: Done
    tls_server: Done
    tls_clients: list[Done]
    mutual_server: Done
    mutual_clients: list[Done]
    intruder: Done
    impostor: Done
    invitations: list[Done]


def token(procs: Processes, name: str, run_dir: str) -> str:
    return procs.run("token", "create", name, "--run-dir", run_dir).ok().stdout.strip()


@pytest.fixture(scope="module")
def runs(procs: Processes, certs: Done, parts: Path) -> Runs:
    """The same federation three ways, at once: simulated, deployed over TLS (the sites join with the command
    of an invitation, which carries the CA's fingerprint, not the CA), deployed over mutual TLS (where a
    client without a certificate also tries to join)."""
    simulation = procs.start("simulate", "digits", "--clients", "2", *ROUNDS, "--backend", "inline", "--quiet")
    tls, mutual = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    invitations = [
        procs.run(
            *("invite", site, "--run-dir", "tls-run", "--server", tls, "--job", "digits", "--certs", "certs")
        ).ok()
        for site in SITES
    ]
    mutual_tokens = {name: token(procs, name, "mutual-run") for name in (*SITES, "intruder")}
    servers = {
        address: procs.start(
            *("server", "digits", "--address", address, *ROUNDS, "--min-clients", "2", "--run-dir", run_dir),
            *("--certs", "certs", *extra, "--join-timeout", "60", "--round-timeout", "60"),
        )
        for address, run_dir, extra in ((tls, "tls-run", ()), (mutual, "mutual-run", ("--mutual-tls",)))
    }

    def client(address: str, name: str, *security: str) -> int:
        data = f"parts/{SITES[0] if name not in SITES else name}.npz"
        return procs.start(
            *("client", "digits", "--server", address, "--data", data, "--token", mutual_tokens[name], *security)
        )

    def invited(invitation: Done, site: str) -> int:
        command = shlex.split(invitation.stdout.strip())
        assert command[:2] == ["fedloom", "client"]
        assert command[-1] == "DATA"
        return procs.start(*command[1:-1], f"parts/{site}.npz")

    tls_clients = [invited(invitation, site) for invitation, site in zip(invitations, SITES, strict=True)]
    ca = ("--ca", "certs/ca.pem")
    # The client without a certificate goes first, while the mutual-TLS server still waits for its two clients
    # (it would be gone once they finish). It retries until the server listens: on a loaded machine the server
    # may take 15 s or more to start.
    intruder = procs.wait(client(mutual, "intruder", *ca, "--retry-for", "60"), timeout=120)
    own = ("--cert", f"certs/clients/{SITES[0]}.pem", "--key", f"certs/clients/{SITES[0]}.key")
    impostor = procs.wait(client(mutual, "intruder", *ca, *own, "--retry-for", "60"), timeout=120)
    mutual_clients = [
        client(mutual, site, *ca, "--cert", f"certs/clients/{site}.pem", "--key", f"certs/clients/{site}.key")
        for site in SITES
    ]
    return Runs(
        simulation=procs.wait(simulation),
        tls_server=procs.wait(servers[tls]),
        tls_clients=[procs.wait(c) for c in tls_clients],
        mutual_server=procs.wait(servers[mutual]),
        mutual_clients=[procs.wait(c) for c in mutual_clients],
        intruder=intruder,
        impostor=impostor,
        invitations=invitations,
    )


def test_a_deployment_over_tls_gives_the_same_model_as_simulation(runs: Runs, procs: Processes):
    ca_fingerprint = fingerprint((procs.cwd / "certs" / "ca.pem").read_bytes())
    for invitation in runs.invitations:
        assert f"--ca-fingerprint {ca_fingerprint} --data DATA" in invitation.stdout
    server = runs.tls_server.ok()
    assert server.sha256() == runs.simulation.ok().sha256()
    assert "with TLS" in server.stdout
    assert "without TLS" not in server.stderr
    for done in runs.tls_clients:
        assert "answered 4 instructions" in done.ok().stdout
        assert "without TLS" not in done.stderr


def test_mutual_tls_admits_clients_with_certificates_and_refuses_one_without(runs: Runs):
    assert runs.mutual_server.ok().sha256() == runs.simulation.sha256()
    assert "clients connected: client-000, client-001" in runs.mutual_server.stdout
    for done in runs.mutual_clients:
        assert "answered 4 instructions" in done.ok().stdout
    assert "requires a client certificate" in runs.intruder.error()
    # A site's certificate with another site's token: refused, naming both.
    refusal = "refused this client: the client certificate names client-000, the token names intruder"
    assert runs.impostor.error().endswith(refusal)


def test_tls_mismatches_are_one_line_errors(procs: Processes, certs: Done, parts: Path):
    tls_address, plain_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    servers = [
        procs.start(
            *("server", "digits", "--address", address, "--rounds", "1", "--min-clients", "9"),
            *("--join-timeout", "60", "--run-dir", run_dir, *security),
        )
        for address, run_dir, security in (
            (tls_address, "mismatch-tls", ("--certs", "certs")),
            (plain_address, "mismatch-plain", ("--insecure",)),
        )
        if token(procs, "a", run_dir)
    ]
    client = ("client", "digits", "--data", "parts/client-000.npz", "--token", "flt_unused", "--retry-for", "30")
    started = time.monotonic()
    handles = {
        "wrong_ca": procs.start(*client, "--server", tls_address, "--ca", "other/ca.pem"),
        "plaintext_to_tls": procs.start(*client, "--server", tls_address, "--insecure"),
        "tls_to_plaintext": procs.start(*client, "--server", plain_address, "--ca", "certs/ca.pem"),
        "cert_without_key": procs.start(*client, "--server", tls_address, "--ca", "certs/ca.pem", "--cert", "x"),
        "missing_ca": procs.start(*client, "--server", tls_address, "--ca", "nowhere.pem"),
        "wrong_fingerprint": procs.start(
            *client,
            "--server",
            tls_address,
            "--ca-fingerprint",
            fingerprint((procs.cwd / "other" / "ca.pem").read_bytes()),
        ),
    }
    done = {name: procs.wait(handle, timeout=60) for name, handle in handles.items()}
    assert "its certificate is not signed by the CA given with --ca" in done["wrong_ca"].error()
    assert "it probably requires TLS" in done["plaintext_to_tls"].error()
    assert "it does not speak TLS" in done["tls_to_plaintext"].error()
    assert done["cert_without_key"].error() == "--cert and --key go together: give both for mutual TLS, or neither"
    assert done["missing_ca"].error().startswith("cannot read the CA certificate nowhere.pem:")
    assert (
        f"the server at {tls_address} sent no certificate with fingerprint sha256:" in done["wrong_fingerprint"].error()
    )
    assert time.monotonic() - started < 120  # bounded: every client gives up by itself, even on a loaded machine
    for handle in servers:
        procs.kill(handle)
