"""Faults in a real deployment on 127.0.0.1: a client killed mid-round, a client whose task fails, the server
killed and resumed, a bad or revoked token, a NaN update, and a hundred clients held through three rounds.

Processes run as in ``test_deployment.py`` (hermetic environment, output to files, bounded waits, killed in
teardown). ``slow_digits.py`` is the digits job with a task that sleeps ``SLOW_FIT_S`` seconds before each
fit, so that "mid-round" is a moment a test can hit.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_deployment import Done, Processes, free_port, wait_until

from fedloom.data.base import ArrayData, ClientData
from fedloom.data.clientfile import load_client_data, save_client_data
from fedloom.tracking import RunStore, views
from fedloom.tracking.tokens import TokenStore

# Servers and clients run as fedloom processes talking gRPC on loopback.
pytestmark = pytest.mark.integration

SLOW_JOB = '''\
"""The digits job, with a task that first sleeps SLOW_FIT_S seconds (from the environment) in each fit, and
waits (60 s at most) until the file named in GATE exists where that is set, then fails if the round is
FAIL_ROUND, else logs a line."""

import logging
import os
import time
from pathlib import Path

import fedloom as fl
from fedloom.examples.digits import job as digits


class SlowTask:
    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def fit(self, *args, **kwargs):
        time.sleep(float(os.environ.get("SLOW_FIT_S", "0")))
        gate, deadline = os.environ.get("GATE"), time.monotonic() + 60
        while gate and not Path(gate).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if os.environ.get("FAIL_ROUND") == str(fl.context.server_round):
            raise ValueError(f"bad batch in round {fl.context.server_round}")
        logging.getLogger("slow_digits").info("training in round %d", fl.context.server_round)
        return self.inner.fit(*args, **kwargs)


job = fl.Job(
    name="slow_digits", task=SlowTask(digits.task), data=digits.data, strategy=digits.strategy,
    simulation=digits.simulation,
)
'''

LIGHT_JOB = '''\
"""Light clients for a crowd: logistic regression on digits, one local epoch."""

import fedloom as fl
from fedloom.data import load_digits

job = fl.Job(
    name="light_digits",
    task=fl.LogisticRegressionTask(num_features=64, num_classes=10),
    data=load_digits,
    strategy=fl.FedAvg(fraction=1.0, fraction_evaluate=0.0, fit=fl.FitConfig(local_epochs=1, batch_size=16, lr=0.1)),
    simulation=fl.SimulationConfig(num_clients=100, rounds=3, partition=fl.PartitionConfig(scheme="iid")),
)
'''

# Runs many client agents in one process (light clients may share processes), each in a thread.
CROWD = """\
import json, sys, threading
from fedloom.data.clientfile import load_client_data
from fedloom.app.job import load_job
from fedloom.runtime.client import client_app
from fedloom.runtime.net.client import run_client

job = load_job(sys.argv[1])
server, tokens, parts = sys.argv[2], json.load(open(sys.argv[3])), sys.argv[4]
answered = {}

def serve(name, token):
    app = client_app(job.task, deployed=True)
    answered[name] = run_client(app, load_client_data(f"{parts}/{name}.npz"), server=server, token=token,
                                retry_for=60)

threads = [threading.Thread(target=serve, args=item, daemon=True) for item in tokens.items()]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join(timeout=240)
print(json.dumps(answered))
"""

SITES = ("client-000", "client-001", "client-002")


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    runner = Processes(tmp_path_factory.mktemp("faults"))
    (runner.cwd / "slow_digits.py").write_text(SLOW_JOB)
    (runner.cwd / "light_digits.py").write_text(LIGHT_JOB)
    (runner.cwd / "crowd.py").write_text(CROWD)
    runner.run("partition", "digits", "--clients", "3", "--seed", "5", "--out", "parts").ok()
    yield runner
    runner.close()


def tokens(procs: Processes, run_dir: str, names: tuple[str, ...]) -> dict[str, str]:
    store = TokenStore(procs.cwd / run_dir)
    try:
        return {name: store.create(name) for name in names}
    finally:
        store.close()


def rounds_recorded(db: Path) -> int:
    """How many rounds the server's run database holds now (0 while it does not exist or is busy)."""
    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0])
    except sqlite3.Error:
        return 0


def final_error(done: Done) -> str:
    """The error a client ended with (exit code 2): its last line on stderr, after its warnings (waiting for the
    server, no TLS)."""
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr, done
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), done
    return last.removeprefix("error: ")


def server_args(address: str, run_dir: str, rounds: int, *extra: str, job: str = "slow_digits.py") -> tuple[str, ...]:
    return (
        *("server", job, "--address", address, "--rounds", str(rounds), "--seed", "5", "--run-dir", run_dir),
        *("--insecure", "--join-timeout", "60", *extra),
    )


def client_args(address: str, site: str, token: str, *extra: str) -> tuple[str, ...]:
    return (
        *("client", "slow_digits.py", "--server", address, "--data", f"parts/{site}.npz", "--token", token),
        *("--insecure", *extra),
    )


def test_a_client_killed_mid_round_does_not_stall_the_round(procs: Processes):
    address = f"127.0.0.1:{free_port()}"
    keys = tokens(procs, "killed-client", SITES)
    server = procs.start(*server_args(address, "killed-client", 2, "--min-clients", "3", "--round-timeout", "300"))
    clients = {site: procs.start(*client_args(address, site, keys[site])) for site in SITES[:2]}
    # The third site trains slowly: it is surely inside round 1's fit when it is killed.
    victim = procs.start(*client_args(address, SITES[2], keys[SITES[2]]), env={"SLOW_FIT_S": "60"})
    wait_until(lambda: "clients connected" in procs.output(server), 90, "three clients")
    time.sleep(1.0)
    killed_at = time.monotonic()
    procs.kill(victim)
    done = procs.wait(server, timeout=120).ok()
    # Dropped as soon as its stream closed, not at the 300 s deadline.
    assert time.monotonic() - killed_at < 60
    assert "round 1/2  clients 2/3" in done.stdout
    assert "round 2/2  clients 2/2" in done.stdout
    assert "client client-002 did not reply to its fit instruction (disconnected)" in done.stderr
    for handle in clients.values():
        assert "answered 4 instructions" in procs.wait(handle).ok().stdout
    events = RunStore(procs.cwd).client_events(str(procs.cwd / "killed-client"))
    mine = [(e["round"], e["event"]) for e in events if e["client_id"] == SITES[2]]
    assert (1, "training") in mine
    assert (1, "dropped") in mine
    assert (None, "disconnected") in mine
    # The timeline goes on past the last round: the others leave when the server says bye.
    assert [e["event"] for e in events if e["client_id"] == SITES[0]][-1] == "disconnected"


def test_a_failing_task_is_reported_at_once_with_its_traceback_and_the_sites_telemetry_is_kept(procs: Processes):
    address = f"127.0.0.1:{free_port()}"
    keys = tokens(procs, "failing", SITES)
    server = procs.start(*server_args(address, "failing", 2, "--min-clients", "3", "--round-timeout", "60"))
    healthy = procs.start(*client_args(address, SITES[0], keys[SITES[0]]))
    failing = procs.start(*client_args(address, SITES[1], keys[SITES[1]]), env={"FAIL_ROUND": "1"})
    quiet = procs.start(*client_args(address, SITES[2], keys[SITES[2]], "--no-send-logs"))
    procs.wait(server).ok()
    for handle in (healthy, quiet):
        procs.wait(handle).ok()
    told = procs.wait(failing)
    assert told.returncode == 0, told
    assert "ValueError: bad batch in round 1" in told.stderr  # the site's own console shows it too

    store = RunStore(procs.cwd)
    run = str(procs.cwd / "failing")
    fits = {(r["round"], r["client_id"]): r for r in store.client_metrics(run) if r["phase"] == "fit"}
    failed = fits[(1, SITES[1])]
    assert (failed["status"], failed["detail"]) == ("dropped", "its task failed: ValueError: bad batch in round 1")
    assert store.rounds(run)[0]["seconds"] < 30  # the round did not wait for the failed site's deadline (60 s)
    assert fits[(2, SITES[1])]["status"] == "ok"  # the site stayed on for the next round
    for record in fits.values():
        if record["status"] == "ok":
            assert record["metrics"]["sys_download_seconds"] >= 0, record
            assert record["metrics"]["sys_upload_seconds"] >= 0, record
            assert record["metrics"]["sys_peak_rss_mb"] > 10, record

    lines = views.logs_view(store, run, limit=5000)["lines"]
    said = {(x["round"], x["client_id"], x["level"]): x["message"] for x in lines}
    assert said[(1, SITES[0], "INFO")] == "training in round 1"
    assert said[(2, SITES[1], "INFO")] == "training in round 2"
    traceback = said[(1, SITES[1], "ERROR")]
    assert traceback.startswith("the task failed on the fit instruction")
    assert "Traceback (most recent call last):" in traceback
    assert traceback.endswith("ValueError: bad batch in round 1")
    assert not [x for x in lines if x["client_id"] == SITES[2]]  # --no-send-logs
    assert fits[(1, SITES[2])]["metrics"]["sys_cpu_seconds"] >= 0  # its measurements still came


def test_secure_aggregation_over_grpc_recovers_a_site_killed_mid_protocol(procs: Processes):
    """Three sites under --secagg (t = 2). The third is killed while it trains, after it advertised its keys and
    shared them: the server rebuilds its pairwise masks from the others' shares and unmasks the sum of two."""
    address = f"127.0.0.1:{free_port()}"
    keys = tokens(procs, "secagg", SITES)
    args = server_args(address, "secagg", 2, "--secagg", "--min-clients", "3", "--round-timeout", "300")
    server = procs.start(*args)
    clients = {site: procs.start(*client_args(address, site, keys[site])) for site in SITES[:2]}
    victim = procs.start(*client_args(address, SITES[2], keys[SITES[2]]), env={"SLOW_FIT_S": "60"})
    wait_until(lambda: "clients connected" in procs.output(server), 90, "three clients")

    time.sleep(3.0)  # the keys are advertised and shared within milliseconds; the victim then trains for 60 s
    procs.kill(victim)
    done = procs.wait(server, timeout=120).ok()
    assert "round 1/2  clients 2/3" in done.stdout
    assert "round 2/2  clients 2/2" in done.stdout
    assert "round 1: client-002 dropped after sharing keys; their masks are rebuilt" in done.stderr
    for handle in clients.values():
        procs.wait(handle).ok()
    run = str(procs.cwd / "secagg")
    store = RunStore(procs.cwd)
    rounds = store.rounds(run)
    assert [r["secagg_survivors"] for r in rounds] == [2.0, 2.0]
    assert [r["secagg_clients"] for r in rounds] == [3.0, 2.0]
    assert rounds[1]["federated_accuracy"] > rounds[0]["federated_accuracy"] > 0.2
    fits = [
        (c["round"], c["client_id"], c["status"], c["num_examples"])
        for c in store.client_metrics(run)
        if c["phase"] == "fit"
    ]
    assert (1, SITES[2], "dropped", 0) in fits
    assert {(r, cid) for r, cid, status, n in fits if status == "ok" and n == 0} == {
        (r, site) for r in (1, 2) for site in SITES[:2]
    }  # the server never learns a site's example count
    ledger = [json.loads(line) for line in (procs.cwd / "secagg" / "ledger.jsonl").read_text().splitlines()]
    assert [(e["round"], e["client"], e["protection"]) for e in ledger] == [
        (r, site, "secagg") for r in (1, 2) for site in SITES[:2]
    ]
    assert "intact" in procs.run("ledger", "verify", "secagg", "--runs", ".").ok().stdout


def test_paillier_over_grpc_gives_the_simulations_model_bit_for_bit(procs: Processes):
    """Three sites with the federation's Paillier key: the server adds ciphertexts with the public key only, one
    site decrypts the sum. Quantization is deterministic and the sums exact, so the deployment ends on the model
    of a simulation of the same job and seed under --paillier (whose key is another: keys do not change sums)."""
    address = f"127.0.0.1:{free_port()}"
    keys = tokens(procs, "paillier", SITES)
    made = procs.run("privacy", "paillier-keys", "--out", "he-keys", "--bits", "1024").ok()
    assert "paillier.key" in made.stdout
    assert (procs.cwd / "he-keys" / "paillier.key").stat().st_mode & 0o077 == 0  # the sites' secret: owner only
    simulation = procs.start(
        *("simulate", "slow_digits.py", "--clients", "3", "--rounds", "2", "--seed", "5", "--backend", "inline"),
        *("--quiet", "--out", "sim-paillier", "--paillier", "--paillier-bits", "1024"),
    )
    server = procs.start(
        *server_args(address, "paillier", 2, "--min-clients", "3", "--paillier", "he-keys/paillier.pub")
    )
    sites = [
        procs.start(*client_args(address, site, keys[site], "--paillier-key", "he-keys/paillier.key")) for site in SITES
    ]
    done = procs.wait(server, timeout=180).ok()
    assert done.sha256() == procs.wait(simulation).ok().sha256()
    for handle in sites:
        procs.wait(handle).ok()
    rounds = RunStore(procs.cwd).rounds(str(procs.cwd / "paillier"))
    assert [r["he_clients"] for r in rounds] == [3.0, 3.0]
    ledger = [json.loads(line) for line in (procs.cwd / "paillier" / "ledger.jsonl").read_text().splitlines()]
    assert {e["protection"] for e in ledger} == {"paillier"}
    assert len(ledger) == 6


# SCAFFOLD, whose server and sites both keep state, is the demanding case and runs by default; FedAvg and FedAdam
# (30 s each) run with `-m slow`, to keep the default suite within its time.
@pytest.mark.parametrize(
    "strategy",
    [
        pytest.param((), marks=pytest.mark.slow, id="fedavg"),
        pytest.param(("--strategy", "fedadam", "--strategy-arg", "eta=0.05"), marks=pytest.mark.slow, id="fedadam"),
        pytest.param(("--strategy", "scaffold"), id="scaffold"),
    ],
)
def test_a_server_killed_with_sigkill_resumes_and_no_round_is_lost_or_run_twice(procs: Processes, strategy):
    # With FedAdam the resumed server must also restore the optimizer's moments to end on the simulation's model.
    # With SCAFFOLD each site must also keep its control variate as of the rounds the server completed: a site
    # that trained in the round the kill cut short trains that round again from its state before it.
    address = f"127.0.0.1:{free_port()}"
    run_dir = "resumed-" + (strategy[1] if strategy else "fedavg")
    keys = tokens(procs, run_dir, SITES)
    simulation = procs.start(
        *("simulate", "slow_digits.py", "--clients", "3", "--rounds", "5", "--seed", "5", "--backend", "inline"),
        *("--quiet", "--out", f"sim-{run_dir}", *strategy),
    )
    args = server_args(address, run_dir, 5, "--min-clients", "3", "--round-timeout", "60", *strategy)
    first = procs.start(*args)
    # Two sites fit in 0.3 s and one in 2 s, and the kill comes 1 s into round 3: after the fast sites have
    # trained (and a SCAFFOLD site has its new control variate), before the slow one has replied.
    clients = [
        procs.start(
            *client_args(address, site, keys[site], "--retry-for", "120", "--state-dir", f"{run_dir}-{site}"),
            env={"SLOW_FIT_S": "2.0" if site == SITES[-1] else "0.3"},
        )
        for site in SITES
    ]
    db = procs.cwd / run_dir / "run.db"
    wait_until(lambda: rounds_recorded(db) >= 2, 120, "two rounds")
    time.sleep(1.0)
    procs.kill(first)
    done_before = rounds_recorded(db)
    assert done_before < 5
    second = procs.wait(procs.start(*args), timeout=180).ok()
    assert "resuming run " in second.stdout
    assert f"after round {done_before} of 5" in second.stdout
    for handle in clients:
        procs.wait(handle).ok()
    assert second.sha256() == procs.wait(simulation).ok().sha256()
    store = RunStore(procs.cwd)
    rounds = store.rounds(str(procs.cwd / run_dir))
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    assert all(r["num_ok"] == 3 for r in rounds)
    assert store.info(str(procs.cwd / run_dir)).status == "finished"
    # A finished run is not run again.
    again = procs.run(*args)
    assert "has finished already; start another with a new run directory" in again.error()


def test_a_site_restarted_mid_run_keeps_its_scaffold_state_and_the_run_ends_on_the_simulation_model(
    procs: Processes,
):
    """A SCAFFOLD site is killed (SIGKILL) after it has replied in round 2 and started again with the same
    --state-dir, while the server still waits for a slow site. It comes back in time for round 3, whose
    training starts from the control variate it saved in round 2: the run ends on the simulation's model."""
    address = f"127.0.0.1:{free_port()}"
    keys = tokens(procs, "restarted-site", SITES)
    scaffold = ("--strategy", "scaffold")
    simulation = procs.start(
        *("simulate", "slow_digits.py", "--clients", "3", "--rounds", "3", "--seed", "5", "--backend", "inline"),
        *("--quiet", "--out", "sim-restarted-site", *scaffold),
    )
    server = procs.start(*server_args(address, "restarted-site", 3, "--min-clients", "3", *scaffold))

    def site(name: str) -> tuple[str, ...]:
        return client_args(address, name, keys[name], "--retry-for", "120", "--state-dir", f"restarted-{name}")

    fast = {name: procs.start(*site(name), env={"SLOW_FIT_S": "0.2"}) for name in SITES[:2]}
    slow = procs.start(*site(SITES[2]), env={"SLOW_FIT_S": "20"})
    wait_until(lambda: rounds_recorded(procs.cwd / "restarted-site" / "run.db") >= 1, 120, "round 1")
    # round 2: the fast sites have replied (a 0.2 s fit, with seconds to spare on a loaded machine or beside
    # another xdist worker); the slow one trains for 20 s, long enough for the killed site to come back
    time.sleep(5.0)
    staged = procs.cwd / f"restarted-{SITES[0]}" / "staged" / "round_00002" / "scaffold.control.safetensors"
    assert staged.is_file()  # its round 2 control variate, on its disk, not yet committed
    procs.kill(fast[SITES[0]])
    again = procs.start(*site(SITES[0]), env={"SLOW_FIT_S": "0.2"})
    done = procs.wait(server, timeout=180).ok()
    assert done.sha256() == procs.wait(simulation).ok().sha256()
    assert "answered" in procs.wait(again).ok().stdout
    for handle in (fast[SITES[1]], slow):
        procs.wait(handle).ok()
    rounds = RunStore(procs.cwd).rounds(str(procs.cwd / "restarted-site"))
    assert [r["num_ok"] for r in rounds][2] >= 3  # all three sites trained in round 3
    assert (procs.cwd / f"restarted-{SITES[0]}" / "scaffold.control.safetensors").is_file()  # committed at bye


def test_an_interrupted_server_says_no_bye_and_its_clients_rejoin_when_it_resumes(procs: Processes):
    address = f"127.0.0.1:{free_port()}"
    keys = tokens(procs, "interrupted", SITES[:2])
    args = server_args(address, "interrupted", 4, "--min-clients", "2", "--round-timeout", "60")
    first = procs.start(*args)
    clients = [
        procs.start(*client_args(address, site, keys[site], "--retry-for", "120"), env={"SLOW_FIT_S": "0.6"})
        for site in SITES[:2]
    ]
    # Fits slow enough that the run cannot end before Ctrl-C reaches it; it often lands while the server writes
    # the round it just recorded, which is what the run store's transactions hold it back for.
    wait_until(lambda: rounds_recorded(procs.cwd / "interrupted" / "run.db") >= 1, 120, "one round")
    procs.interrupt(first)  # Ctrl-C
    stopped = procs.wait(first, timeout=60)
    assert stopped.returncode == 130, stopped
    assert RunStore(procs.cwd).info(str(procs.cwd / "interrupted")).status == "failed", stopped
    time.sleep(2.0)
    assert all(procs.running(handle) for handle in clients)  # no bye: they keep trying to reconnect
    second = procs.wait(procs.start(*args), timeout=180).ok()
    assert "resuming run " in second.stdout
    for handle in clients:
        assert "the server said bye" in procs.wait(handle).ok().stdout
    rounds = RunStore(procs.cwd).rounds(str(procs.cwd / "interrupted"))
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]


def test_bad_and_revoked_tokens_are_refused_and_the_server_serves_the_others(procs: Processes):
    address = f"127.0.0.1:{free_port()}"
    keys = tokens(procs, "tokens", SITES[:2])
    procs.run("token", "revoke", SITES[1], "--run-dir", "tokens").ok()
    listed = procs.run("token", "list", "--run-dir", "tokens").ok().stdout
    assert "client-000" in listed
    assert "client-001" in listed
    assert "revoked" in listed
    server = procs.start(*server_args(address, "tokens", 1, "--min-clients", "1", "--round-timeout", "60"))
    refused = {
        "wrong": procs.start(*client_args(address, SITES[0], "flt_not-a-token", "--retry-for", "60")),
        "revoked": procs.start(*client_args(address, SITES[1], keys[SITES[1]], "--retry-for", "60")),
        "missing": procs.start(*client_args(address, SITES[0], "", "--retry-for", "60")),
    }
    outcome = {name: procs.wait(handle, timeout=90) for name, handle in refused.items()}
    good = procs.start(*client_args(address, SITES[0], keys[SITES[0]]))
    refusal = f"the server at {address} refused this client: unknown or revoked token"
    assert final_error(outcome["wrong"]) == refusal
    assert final_error(outcome["revoked"]) == refusal
    assert "no token" in final_error(outcome["missing"])
    done = procs.wait(server).ok()
    assert "clients connected: client-000" in done.stdout
    assert done.stderr.count("refused a client from") == 3
    assert "answered 2 instructions" in procs.wait(good).ok().stdout


def test_a_nan_update_is_refused_the_client_is_told_and_the_others_go_on(procs: Processes):
    good = load_client_data(procs.cwd / "parts" / "client-002.npz")
    poisoned = good.train.x.copy()
    poisoned[0, 0] = np.nan  # SGD spreads it into every weight: the update holds NaN
    save_client_data(procs.cwd / "nan.npz", ClientData(ArrayData(poisoned, good.train.y), good.test))
    address = f"127.0.0.1:{free_port()}"
    keys = tokens(procs, "nan", SITES)
    server = procs.start(*server_args(address, "nan", 2, "--min-clients", "3", "--round-timeout", "60"))
    clients = [procs.start(*client_args(address, site, keys[site])) for site in SITES[:2]]
    bad = procs.start(
        *("client", "slow_digits.py", "--server", address, "--data", "nan.npz", "--token", keys[SITES[2]]),
        "--insecure",
    )
    done = procs.wait(server).ok()
    assert "round 1/2  clients 2/3" in done.stdout
    assert "refused the fit reply of client client-002: parameter" in done.stderr
    told = procs.wait(bad).ok()
    assert "the server says: round 1: the server refused your fit reply: parameter" in told.stderr
    assert "holds NaN or infinite values" in told.stderr
    for handle in clients:
        procs.wait(handle).ok()
    records = RunStore(procs.cwd).client_metrics(str(procs.cwd / "nan"))
    fits = {(r["round"], r["client_id"]): r for r in records if r["phase"] == "fit"}
    assert fits[(1, "client-002")]["status"] == "refused"
    assert "NaN" in fits[(1, "client-002")]["detail"]
    assert fits[(1, "client-000")]["status"] == "ok"


def test_a_hundred_clients_are_held_through_three_rounds(procs: Processes):
    names = tuple(f"client-{i:03d}" for i in range(100))
    procs.run("partition", "light_digits.py", "--clients", "100", "--out", "crowd-parts").ok()
    keys = tokens(procs, "crowd", names)
    halves = [dict(list(keys.items())[:50]), dict(list(keys.items())[50:])]
    for i, half in enumerate(halves):
        (procs.cwd / f"crowd-{i}.json").write_text(json.dumps(half))
    address = f"127.0.0.1:{free_port()}"
    server = procs.start(
        *server_args(address, "crowd", 3, "--min-clients", "100", "--round-timeout", "120", job="light_digits.py")
    )
    crowd = [
        procs.start("crowd.py", "light_digits.py", address, f"crowd-{i}.json", "crowd-parts", python=True)
        for i in range(2)
    ]
    done = procs.wait(server, timeout=240).ok()
    assert "round 3/3  clients 100/100" in done.stdout
    for handle in crowd:
        answered = json.loads(procs.wait(handle, timeout=60).ok().stdout)
        assert len(answered) == 50
        assert set(answered.values()) == {3}  # one fit per round, no evaluation
    rounds = RunStore(procs.cwd).rounds(str(procs.cwd / "crowd"))
    assert [r["num_ok"] for r in rounds] == [100, 100, 100]
