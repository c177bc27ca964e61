"""Local DP-SGD's privacy-utility curve on digits: accuracy and each client's epsilon at a few noise levels, against
the same federation without DP.

    python benchmarks/dpsgd.py [--clients 10] [--rounds 10] [--clip 1.0] [--noise 1.0 1.5 2.5] [--seeds 3]

The ``digits`` job split IID over 10 clients (115 or 116 training examples each, once 20% is held out: a few silos
with some data each, the setting sample-level DP is for). Every client trains every round, 1 local epoch with
Poisson-sampled batches of expected size 16 (q = 16 / n_k), each example's gradient clipped to C and Gaussian noise
z C added to the sum (Opacus, through ``fedloom.privacy.DPSGDTask``). A client's epsilon composes every step it took
in the run: ``epsilon(z, q_k, steps_k, delta=1e-5)`` by dp-accounting's RDP accountant. The reference is the plain
task with the same FedAvg, batch size and learning rate. The DP runs draw their batches and noise from the
simulation seed (``reproducible=True``), so each row can be measured again; a deployment leaves that off.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import opacus
import torch

import fedloom as fl
from fedloom.privacy import DPSGDTask
from fedloom.strategy import FedAvg


def client_epsilons(run: fl.Run, task: DPSGDTask) -> list[float]:
    """Each client's epsilon over the whole run: all its DP-SGD steps, at its sampling rate."""
    steps: dict[str, int] = defaultdict(int)
    rates: dict[str, float] = {}
    for record in run.history:
        for client in record.clients:
            if client.phase == "fit" and "dp_sgd_sample_rate" in client.metrics:
                steps[client.client_id] += int(client.metrics["steps"])
                rates[client.client_id] = client.metrics["dp_sgd_sample_rate"]
    return [task.spent(sample_rate=rates[c], steps=steps[c]) for c in sorted(steps)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clip", type=float, default=1.0, help="per-example clip norm C")
    parser.add_argument("--noise", type=float, nargs="+", default=[1.0, 1.5, 2.5], help="noise multipliers z")
    parser.add_argument("--batch", type=int, default=16, help="expected batch size B (q = B / n_k)")
    parser.add_argument("--lr", type=float, default=0.5, help="clients' learning rate")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models gain nothing from more)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print("$ python benchmarks/dpsgd.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(
        f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
        f"opacus {opacus.__version__}, {args.threads} torch thread(s), {platform.platform()}"
    )
    job = fl.load_job("digits")
    fit = fl.FitConfig(local_epochs=1, batch_size=args.batch, lr=args.lr)
    strategy = FedAvg(fraction=1.0, fit=fit, fraction_evaluate=0.0)
    simulation = replace(
        job.simulation,
        num_clients=args.clients,
        rounds=args.rounds,
        partition=replace(job.simulation.partition, scheme="iid"),
        backend=replace(job.simulation.backend, name="inline"),
    )
    print(f"digits: {args.clients} clients (iid), {args.rounds} rounds, C={args.clip}, {fit}")
    tasks: dict[str, fl.Task] = {"FedAvg (no DP)": job.task}
    for z in args.noise:
        tasks[f"DP-SGD z={z:g}"] = DPSGDTask(job.task, noise_multiplier=z, max_grad_norm=args.clip, reproducible=True)
    rows = []
    for name, task in tasks.items():
        accuracies, epsilons = [], []
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as out:
                run = fl.simulate(
                    replace(job, task=task, strategy=strategy), simulation=replace(simulation, seed=seed), runs_dir=out
                )
            accuracies.append(run.final_metrics["central_accuracy"])
            if isinstance(task, DPSGDTask):
                epsilons.extend(client_epsilons(run, task))
            print(f"  {name}, seed {seed}: central accuracy {accuracies[-1]:.4f}", flush=True)
        rows.append((name, accuracies, epsilons))
    print()
    print("| run | client epsilon at delta 1e-5 (median, max) | central accuracy (mean ± std) | by seed |")
    print("|---|---:|---:|---|")
    for name, accuracies, epsilons in rows:
        shown = f"{np.median(epsilons):.2f}, {max(epsilons):.2f}" if epsilons else "∞ (no DP)"
        by_seed = ", ".join(f"{a:.4f}" for a in accuracies)
        print(f"| {name} | {shown} | {np.mean(accuracies):.4f} ± {np.std(accuracies):.4f} | {by_seed} |")
    print(f"runtime: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
