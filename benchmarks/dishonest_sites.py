"""Issue 25's acceptance, measured: what one dishonest site does to a deployed federation.

Real processes over loopback: a ``fedloom server`` for the digits job (3 rounds, seed 5) and three sites on the
partitions of ``fedloom partition digits --clients 3 --seed 5``; site-c is either honest or
``tests/net/dishonest_site.py`` (an honest client runtime whose client mod rewrites each fit reply). Runs:

- ``honest``: the three sites honest (the reference);
- ``claims``: site-c claims 10^12 examples in every reply;
- ``scale``: site-c sends 10^6 times its update every round;
- ``without``: site-a and site-b alone (the reference for ``scale``);
- ``scale, guard off``: as ``scale`` with ``--strategy fedavg --strategy-arg update_guard=null``, to show what
  the guard prevents.

It prints each run's outcome, final federated loss, the final model's loss on the central test set and its
``params_sha256``, then the acceptance differences. ``python benchmarks/dishonest_sites.py`` (about 2 minutes on
2 cores).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fedloom as fl
from fedloom.app.simulation import load_federation
from fedloom.core.checkpoint import load_params
from fedloom.tracking.recorder import checkpoint_path

ROUNDS = 3
SITES = ("site-a", "site-b", "site-c")
SCRIPT = Path(__file__).resolve().parent.parent / "tests" / "net" / "dishonest_site.py"
FEDLOOM = [sys.executable, "-c", "from fedloom.cli.main import main; main()"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fedloom(*args: object, cwd: Path) -> str:
    done = subprocess.run([*FEDLOOM, *map(str, args)], cwd=cwd, capture_output=True, text=True, check=True)
    return done.stdout


def deploy(work: Path, name: str, sites: dict[str, str], *extra: str) -> dict[str, object]:
    """One deployment; returns its outcome and numbers."""
    run_dir = work / name
    address = f"127.0.0.1:{free_port()}"
    started = time.perf_counter()
    server = subprocess.Popen(
        [*FEDLOOM, "server", "digits", "--address", address, "--rounds", str(ROUNDS), "--min-clients",
         str(len(sites)), "--seed", "5", "--run-dir", str(run_dir), "--insecure", "--join-timeout", "60",
         "--round-timeout", "60", *extra],
        cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    clients = []
    for site, behaviour in sites.items():
        token = fedloom("token", "create", site, "--run-dir", run_dir, cwd=work).strip()
        data = f"parts/client-00{SITES.index(site)}.npz"
        command = (
            [*FEDLOOM, "client", "digits", "--server", address, "--data", data, "--token", token, "--insecure"]
            if behaviour == "honest"
            else [sys.executable, str(SCRIPT), address, data, token, behaviour]
        )
        clients.append(subprocess.Popen(command, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    out, err = server.communicate(timeout=600)
    for client in clients:
        try:
            client.wait(timeout=30)
        except subprocess.TimeoutExpired:
            client.kill()
    result: dict[str, object] = {"run": name, "seconds": time.perf_counter() - started}
    if server.returncode != 0:
        result["outcome"] = "failed: " + (err.strip().splitlines() or ["?"])[-1][:150]
        return result
    rounds = re.findall(r"round (\d+)/", out)
    result["outcome"] = f"finished {rounds[-1] if rounds else '?'}/{ROUNDS} rounds"
    result["federated_loss"] = float(re.findall(r"federated_loss ([0-9.]+)", out)[-1])
    result["sha"] = re.findall(r"params_sha256 ([0-9a-f]{64})", out)[-1]
    job = fl.load_job("digits")
    data, _ = load_federation(job, job.simulation)
    params = load_params(checkpoint_path(run_dir, ROUNDS))
    result["central_loss"] = job.task.evaluate(params, data.central_test).loss
    result["refused_rounds"] = err.count("refused the fit update of client site-c")
    return result


def main() -> None:
    honest = dict.fromkeys(SITES, "honest")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        os.environ.setdefault("FEDLOOM_CACHE", str(work / "cache"))
        fedloom("partition", "digits", "--clients", "3", "--seed", "5", "--out", "parts", cwd=work)
        runs = [
            deploy(work, "honest", honest),
            deploy(work, "claims", {**honest, "site-c": "claims"}),
            deploy(work, "scale", {**honest, "site-c": "scale"}),
            deploy(work, "without", {"site-a": "honest", "site-b": "honest"}),
        ]
        guard_off = ("--strategy", "fedavg", "--strategy-arg", "update_guard=null")
        runs.append(deploy(work, "scale-guard-off", {**honest, "site-c": "scale"}, *guard_off))
    for run in runs:
        numbers = "  ".join(
            f"{key} {run[key]:.4f}" if isinstance(run[key], float) else f"{key} {run[key]}"
            for key in ("federated_loss", "central_loss", "refused_rounds", "sha")
            if key in run
        )
        print(f"{run['run']:<16} {run['outcome']:<24} {run['seconds']:5.1f} s  {numbers}")
    by = {str(run["run"]): run for run in runs}

    def gap(a: str, b: str, key: str) -> str:
        if key not in by[a] or key not in by[b]:
            return "n/a"
        return f"{abs(float(by[a][key]) - float(by[b][key])):.4f}"  # type: ignore[arg-type]

    print(f"claims vs honest: federated loss differs by {gap('claims', 'honest', 'federated_loss')} (accept <= 0.01);"
          f" same params_sha256: {by['claims'].get('sha') == by['honest'].get('sha')}")  # fmt: skip
    print(f"scale vs without: central loss differs by {gap('scale', 'without', 'central_loss')} (accept <= 0.02);"
          f" site-c refused in {by['scale'].get('refused_rounds')} of {ROUNDS} rounds")  # fmt: skip


if __name__ == "__main__":
    main()
