"""Issue 25's dishonest sites, with real processes over loopback: a ``fedloom server`` for the digits job and three
sites, one of which lies with well-formed updates (``dishonest_site.py``, a client mod around the honest task):
it claims 10^12 examples, or scales its update by 10^6 every round. The run must finish every round, the lie
must be recorded against the site, and the model must end where an honest federation's (or one without that
site) ends."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

import fedloom as fl
from fedloom.app.simulation import load_federation
from fedloom.core.checkpoint import load_params
from fedloom.tracking import RunStore
from fedloom.tracking.recorder import checkpoint_path
from fedloom.tracking.views import clients_view
from tests.net.test_deployment import Done, Processes, free_port

pytestmark = pytest.mark.integration

SITES = ("site-a", "site-b", "site-c")
LIAR = "site-c"
ROUNDS = 3
SCRIPT = Path(__file__).with_name("dishonest_site.py")
FEDERATED_LOSS = re.compile(r"federated_loss ([0-9.]+)")


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    runner = Processes(tmp_path_factory.mktemp("dishonest"))
    runner.run("partition", "digits", "--clients", "3", "--seed", "5", "--out", "parts").ok()
    yield runner
    runner.close()


@dataclass(frozen=True)
class Deployed:
    server: Done
    run_dir: Path

    @property
    def federated_loss(self) -> float:
        return float(FEDERATED_LOSS.findall(self.server.stdout)[-1])

    def central_loss(self) -> float:
        """The final model's loss on the digits job's central test set (the same data for every run)."""
        job = fl.load_job("digits")
        data, _ = load_federation(job, job.simulation)
        params = load_params(checkpoint_path(self.run_dir, ROUNDS))
        return job.task.evaluate(params, data.central_test).loss


def deploy(procs: Processes, name: str, sites: Mapping[str, str], *extra: str) -> Deployed:
    """Serve digits for ``ROUNDS`` rounds to ``sites`` (site name -> ``honest``, ``claims`` or ``scale``); site
    ``i`` trains on partition ``client-00i``."""
    run_dir = procs.cwd / name
    address = f"127.0.0.1:{free_port()}"
    server = procs.start(
        *("server", "digits", "--address", address, "--rounds", str(ROUNDS), "--min-clients", str(len(sites))),
        *("--seed", "5", "--run-dir", run_dir, "--insecure", "--join-timeout", "60", "--round-timeout", "60"),
        *extra,
    )
    clients = []
    for site, behaviour in sites.items():
        token = procs.run("token", "create", site, "--run-dir", run_dir).ok().stdout.strip()
        data = f"parts/client-00{SITES.index(site)}.npz"
        if behaviour == "honest":
            clients.append(
                procs.start("client", "digits", "--server", address, "--data", data, "--token", token, "--insecure")
            )
        else:
            clients.append(procs.start(SCRIPT, address, data, token, behaviour, python=True))
    done = procs.wait(server).ok()
    for client in clients:
        assert procs.wait(client).returncode == 0
    return Deployed(done, run_dir)


@pytest.fixture(scope="module")
def honest(procs: Processes) -> Deployed:
    return deploy(procs, "honest", dict.fromkeys(SITES, "honest"))


@pytest.fixture(scope="module")
def without(procs: Processes) -> Deployed:
    """The two honest sites alone."""
    return deploy(procs, "without", {site: "honest" for site in SITES if site != LIAR})


def fit_records(run: Deployed, site: str) -> list[dict]:
    store = RunStore(run.run_dir.parent)
    return [r for r in store.client_metrics(run.run_dir.name) if r["client_id"] == site and r["phase"] == "fit"]


def test_a_site_claiming_a_trillion_examples_counts_what_it_declared(procs: Processes, honest: Deployed):
    lying = deploy(procs, "claims", {**dict.fromkeys(SITES, "honest"), LIAR: "claims"})
    # Capped at what it declared, its own training set's size: exactly the honest federation's model.
    assert lying.server.sha256() == honest.server.sha256()
    assert abs(lying.federated_loss - honest.federated_loss) <= 0.01
    records = fit_records(lying, LIAR)
    assert len(records) == ROUNDS
    declared = fit_records(honest, LIAR)[0]["num_examples"]
    for record in records:
        assert (record["status"], record["num_examples"]) == ("ok", declared)
        expected = f"claimed 1000000000000 examples, counted {declared}: declared {declared} when it joined"
        assert record["detail"] == expected
    row = next(r for r in clients_view(RunStore(procs.cwd), "claims")["clients"] if r["client_id"] == LIAR)
    assert row["capped"] == ROUNDS


def test_a_site_scaling_its_update_a_millionfold_is_refused_every_round(procs: Processes, without: Deployed):
    scaled = deploy(procs, "scale", {**dict.fromkeys(SITES, "honest"), LIAR: "scale"})
    assert f"round {ROUNDS}/{ROUNDS}" in scaled.server.stdout  # every round ran
    records = fit_records(scaled, LIAR)
    assert [r["status"] for r in records] == ["refused"] * ROUNDS
    assert all("more than update_guard=10 times the round's median" in r["detail"] for r in records)
    assert "refused the fit update of client site-c" in scaled.server.stderr
    for site in SITES[:2]:
        assert [r["status"] for r in fit_records(scaled, site)] == ["ok"] * ROUNDS
    # The model is the one the two honest sites make alone, up to their sampling seeds and the liar's evaluation.
    assert abs(scaled.central_loss() - without.central_loss()) <= 0.02


def test_an_excluded_site_is_never_asked_and_the_run_is_the_one_without_it(procs: Processes, without: Deployed):
    excluded = deploy(procs, "excluded", {**dict.fromkeys(SITES, "honest"), LIAR: "scale"}, "--exclude", LIAR)
    assert "excluded from the rounds: site-c" in excluded.server.stdout
    assert fit_records(excluded, LIAR) == []
    assert excluded.server.sha256() == without.server.sha256()
