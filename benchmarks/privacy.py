"""DP-FedAvg's privacy-utility curve on digits: accuracy at three noise levels against the same run without DP.

    python benchmarks/privacy.py [--clients 500] [--rate 0.1] [--rounds 40] [--clip 0.2] [--seeds 3]

The ``digits`` job split IID over 500 clients (a handful of examples each, as user-level DP assumes: many users,
little data each). Every round each client takes part with probability q (Poisson sampling); DP-FedAvg clips
each update to C, adds Gaussian noise z C to the sum and divides by q n; the server applies it with momentum 0.9
(as McMahan et al. 2018 do). Epsilon is at delta = 1e-5 (< 1/n) from dp-accounting's RDP accountant. The
reference is FedAvg with the same sampling rate, the same local training and the same server momentum.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

import fedloom as fl
from fedloom.privacy import DPFedAvg
from fedloom.strategy import FedAvg, ServerSGD


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--rate", type=float, default=0.1, help="sampling rate q")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--clip", type=float, default=0.2, help="clip norm C")
    parser.add_argument("--noise", type=float, nargs="+", default=[1.0, 1.5, 2.0], help="noise multipliers z")
    parser.add_argument("--lr", type=float, default=0.1, help="clients' learning rate")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    print("$ python benchmarks/privacy.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}")
    job = fl.load_job("digits")
    fit = replace(job.strategy.fit, local_epochs=1, lr=args.lr)
    base = FedAvg(fraction=args.rate, fit=fit, fraction_evaluate=0.0, server_optimizer=ServerSGD(lr=1.0, momentum=0.9))
    simulation = replace(
        job.simulation,
        num_clients=args.clients,
        rounds=args.rounds,
        partition=replace(job.simulation.partition, scheme="iid"),
        backend=replace(job.simulation.backend, name="inline"),
    )
    print(f"digits: {args.clients} clients (iid), q={args.rate}, {args.rounds} rounds, C={args.clip}, {fit}")
    runs: dict[str, tuple[list[float], float | None]] = {}
    strategies = {"FedAvg (no DP)": (base, None)}
    for z in args.noise:
        dp = DPFedAvg(base, num_clients=args.clients, clip_norm=args.clip, noise_multiplier=z, delta=1e-5)
        strategies[f"DP-FedAvg z={z:g}"] = (dp, z)
    for name, (strategy, _z) in strategies.items():
        accuracies = []
        spent = None
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as out:
                done = fl.simulate(
                    replace(job, strategy=strategy, simulation=replace(simulation, seed=seed)), runs_dir=out
                )
            accuracies.append(done.final_metrics["central_accuracy"])
            spent = done.final_metrics.get("epsilon")
            print(f"  {name}, seed {seed}: central accuracy {accuracies[-1]:.4f}", flush=True)
        runs[name] = (accuracies, spent)
    print()
    print("| run | epsilon at delta 1e-5 | central accuracy (mean ± std) | by seed |")
    print("|---|---:|---:|---|")
    for name, (accuracies, spent) in runs.items():
        shown = "∞ (no DP)" if spent is None else f"{spent:.2f}"
        by_seed = ", ".join(f"{a:.4f}" for a in accuracies)
        print(f"| {name} | {shown} | {np.mean(accuracies):.4f} ± {np.std(accuracies):.4f} | {by_seed} |")
    print(f"runtime: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
