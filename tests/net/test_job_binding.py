"""A run bound to its job, with real processes on 127.0.0.1: a job file edited between a ``kill -9`` of the server
and its restart (keeping every shape) is refused on resume, naming what changed, and a new run directory starts
from the old run's model; a site whose job file differs is refused with both digests before it trains, while a
site with the same job file in another folder joins and the run goes on.

Processes run as in ``test_deployment.py`` (hermetic environment, output to files, bounded waits, killed in
teardown)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_deployment import Processes, free_port, wait_until
from test_faults import final_error, rounds_recorded, tokens

import fedloom as fl
from fedloom.core.checkpoint import load_params
from fedloom.core.errors import TransportError
from fedloom.data.base import ArrayData, ClientData
from fedloom.runtime.client import ClientApp
from fedloom.runtime.net.client import run_client
from fedloom.runtime.net.server import FleetServer
from fedloom.tracking import RunStore

# Servers and clients run as fedloom processes talking gRPC on loopback.
pytestmark = pytest.mark.integration

JOB = """\
from torch import nn

import fedloom as fl
from fedloom.data import load_digits


def mlp():
    return nn.Sequential(nn.Linear(64, 32), nn.{activation}(), nn.Linear(32, 10))


job = fl.Job(
    name="mlp",
    task=fl.TorchTask(model=mlp),
    data=load_digits,
    strategy=fl.FedAvg(fraction=1.0, fraction_evaluate=0.0, fit=fl.FitConfig(local_epochs=1, batch_size=16, lr={lr})),
)
"""
SITES = ("client-000", "client-001", "client-002")
ANNOUNCED = re.compile(r"fedloom server: job mlp \((sha256:[0-9a-f]{64})\)")


def write_job(path: Path, *, activation: str = "ReLU", lr: float = 0.1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(JOB.format(activation=activation, lr=lr))


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    runner = Processes(tmp_path_factory.mktemp("jobs"))
    runner.run("partition", "digits", "--clients", "3", "--seed", "5", "--out", "parts").ok()
    yield runner
    runner.close()


def server_args(address: str, job: str, run_dir: str, rounds: int, *extra: str) -> tuple[str, ...]:
    return (
        *("server", job, "--address", address, "--rounds", str(rounds), "--min-clients", "2", "--seed", "5"),
        *("--run-dir", run_dir, "--insecure", "--join-timeout", "60", "--round-timeout", "60", *extra),
    )


def client_args(address: str, job: str, site: str, token: str) -> tuple[str, ...]:
    return ("client", job, "--server", address, "--data", f"parts/{site}.npz", "--token", token, "--insecure")


def test_a_job_edited_between_kill_and_restart_is_refused_naming_the_change_and_a_new_run_starts_from_its_model(
    procs: Processes,
):
    job = "edited/mlp_job.py"
    write_job(procs.cwd / job)
    address = f"127.0.0.1:{free_port()}"
    keys = tokens(procs, "edited-run", SITES[:2])
    args = server_args(address, job, "edited-run", 200)
    first = procs.start(*args)
    clients = [procs.start(*client_args(address, job, site, keys[site])) for site in SITES[:2]]
    db = procs.cwd / "edited-run" / "run.db"
    wait_until(lambda: rounds_recorded(db) >= 2, 120, "two rounds")
    procs.kill(first)
    for handle in clients:
        procs.kill(handle)
    done = rounds_recorded(db)
    assert 2 <= done < 200

    write_job(procs.cwd / job, activation="Tanh")  # the same shapes: before, this resumed silently
    refused = procs.run(*args).error()
    assert refused.startswith("the run in edited-run was started with another job (sha256:"), refused
    assert re.search(r"\): the job file changed \(sha256 [0-9a-f]{12}… then, [0-9a-f]{12}… now\); ", refused)
    assert "; the model's layer 1 is Tanh() now, ReLU() then. " in refused
    assert refused.endswith(
        "give a new --run-dir (with --from-checkpoint edited-run to start from this run's model, where its "
        "parameters still fit)"
    )
    assert rounds_recorded(db) == done  # nothing was recorded, and the run stays as it was
    assert RunStore(procs.cwd).info(str(procs.cwd / "edited-run")).status == "running"

    # The changed job on purpose: a new run directory, starting from the old run's last model.
    address = f"127.0.0.1:{free_port()}"
    keys = tokens(procs, "edited-next", SITES[:2])
    server = procs.start(*server_args(address, job, "edited-next", 1, "--from-checkpoint", "edited-run"))
    clients = [procs.start(*client_args(address, job, site, keys[site])) for site in SITES[:2]]
    finished = procs.wait(server).ok()
    for handle in clients:
        procs.wait(handle).ok()
    start = load_params(procs.cwd / "edited-run" / "checkpoints" / f"round_{done:05d}.safetensors")
    assert f"starting from edited-run/checkpoints/round_{done:05d}.safetensors (params_sha256 {start.sha256()})" in (
        finished.stdout
    )
    config = RunStore(procs.cwd).config(str(procs.cwd / "edited-next"))
    assert config["from_checkpoint"] == start.sha256()
    assert ANNOUNCED.search(finished.stdout).group(1) == config["job_digest"]  # type: ignore[union-attr]


def test_a_site_whose_job_differs_is_refused_with_both_digests_before_it_trains_and_the_others_run(procs: Processes):
    write_job(procs.cwd / "server" / "mlp_job.py")
    write_job(procs.cwd / "site-b" / "job.py")  # the same job file, kept elsewhere under another name
    write_job(procs.cwd / "site-c" / "mlp_job.py", lr=0.05)  # another learning rate: another job
    address = f"127.0.0.1:{free_port()}"
    keys = tokens(procs, "mixed-run", SITES)
    server = procs.start(*server_args(address, "server/mlp_job.py", "mixed-run", 2))
    # The other job's site goes first and is refused before the two that the run waits for start: with them
    # connected, two rounds take a second, and a site still backing off from a server not yet listening would
    # miss the whole run.
    other = procs.start(*client_args(address, "site-c/mlp_job.py", SITES[2], keys[SITES[2]]))
    error = final_error(procs.wait(other, timeout=60))
    same = procs.start(*client_args(address, "server/mlp_job.py", SITES[0], keys[SITES[0]]))
    moved = procs.start(*client_args(address, "site-b/job.py", SITES[1], keys[SITES[1]]))
    finished = procs.wait(server).ok()
    for handle in (same, moved):
        assert "answered 2 instructions" in procs.wait(handle).ok().stdout
    ours = ANNOUNCED.search(finished.stdout).group(1)  # type: ignore[union-attr]
    found = re.fullmatch(
        rf"the server at {address} refused this client: this site's job is not the server's \(the server's digest "
        rf"{ours}, this site's (sha256:[0-9a-f]{{64}})\): run the job file \(or built-in example\) that the server "
        r"runs, unchanged",
        error,
    )
    assert found, error
    assert found.group(1) != ours
    assert "round 2/2  clients 2/2" in finished.stdout

    run = str(procs.cwd / "mixed-run")
    store = RunStore(procs.cwd)
    events = [(e["event"], e["detail"]) for e in store.client_events(run) if e["client_id"] == SITES[2]]
    assert events == [("refused", error.split("refused this client: ")[1])]  # never connected, never trained
    assert {m["client_id"] for m in store.client_metrics(run)} == set(SITES[:2])
    assert store.config(run)["job_digest"] == ours


def test_the_fleet_server_announces_its_job_and_refuses_another_in_the_hello():
    address = f"127.0.0.1:{free_port()}"
    ours, theirs = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    app = ClientApp(fl.LogisticRegressionTask(num_features=2, num_classes=2), ())
    data = ClientData(
        ArrayData(np.zeros((4, 2), np.float32), np.zeros(4, np.int64)),
        ArrayData(np.zeros((2, 2), np.float32), np.zeros(2, np.int64)),
    )
    with FleetServer(address, authenticate=lambda token: token, job_digest=ours) as server:
        with pytest.raises(TransportError) as refused:
            run_client(app, data, server=address, token="site", retry_for=10, job_digest=theirs)
        assert str(refused.value) == (
            f"the server at {address} refused this client: this site's job is not the server's (the server's digest "
            f"{ours}, this site's {theirs}): run the job file (or built-in example) that the server runs, unchanged"
        )
        assert list(server.grid.client_ids()) == []
        assert [(e.client_id, e.event) for e in server.take_events()] == [("site", "refused")]
