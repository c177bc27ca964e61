"""Secure aggregation in a run: the digits quickstart with and without ``SecAgg``, on the same clients.

    python benchmarks/secagg_runs.py [--clients 100] [--rounds 5] [--degree 20] [--dropout 0.05]

Each configuration runs the same job (digits, an MLP of 2,410 parameters, 5 local epochs) for the same rounds
and seed on the inline backend (one client after another in this process, every message through the wire
encoding), so the seconds compare directly:

- ``plain``: FedAvg, as ``fedloom simulate digits``;
- ``secagg``: ``SecAgg(FedAvg)``, every client masking with every other (``--secagg``);
- ``secagg+``: ``SecAgg(FedAvg, degree=K)`` (``--secagg --secagg-degree K``);
- ``secagg+ dropout``: the same with ``--dropout`` of the clients failing each protocol step.

Printed per configuration: wall seconds per round and the ratio to plain, bytes per client per round (both
ways, as encoded) and the ratio to plain, the final central accuracy, and the largest difference of any final
parameter from the plain run's (the quantization error, compounded over the rounds; not meaningful with
dropouts, where other clients are summed).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence

import numpy as np
from fedloom.examples.digits import job

from fedloom.app.simulation import load_federation
from fedloom.privacy import SecAgg
from fedloom.runtime import InlineGrid, run_rounds
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.runtime.sim.dropout import DropoutGrid


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--degree", type=int, default=20)
    parser.add_argument("--dropout", type=float, default=0.05)
    args = parser.parse_args(argv)
    print("$ python benchmarks/secagg_runs.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"machine: {platform.machine()}, Python {platform.python_version()}")
    config = job.simulation
    config = type(config)(**{**config.__dict__, "num_clients": args.clients, "rounds": args.rounds})
    data, _ = load_federation(job, config)
    evaluate = _central(data)
    runs = {
        "plain": (job.strategy, 0.0),
        "secagg": (SecAgg(job.strategy), 0.0),
        f"secagg+ (K = {args.degree})": (SecAgg(job.strategy, degree=args.degree), 0.0),
        f"secagg+ (K = {args.degree}), dropout {args.dropout:g}": (
            SecAgg(job.strategy, degree=args.degree),
            args.dropout,
        ),
    }
    rows, base = [], None
    for name, (strategy, dropout) in runs.items():
        grid = DropoutGrid(InlineGrid(SimulatedClients.of(job.task, data)), dropout, seed=0)
        start = time.perf_counter()
        result = run_rounds(
            strategy=strategy, grid=grid, initial_params=job.task.init_params(0), rounds=args.rounds, seed=0
        )
        seconds = (time.perf_counter() - start) / args.rounds
        fits = [c for r in result.history for c in r.clients if c.phase == "fit"]
        nbytes = sum(c.bytes_down + c.bytes_up for c in fits) / args.clients / args.rounds
        accuracy = evaluate(result.params)
        if base is None:
            base = (seconds, nbytes, result.params)
        diff = max(float(np.abs(result.params[n].astype(np.float64) - base[2][n]).max()) for n in base[2])
        survivors = result.history[-1].metrics.get("secagg_survivors", float(args.clients))
        rows.append((name, seconds, seconds / base[0], nbytes, nbytes / base[1], accuracy, diff, survivors))
    print(f"\ndigits, {args.clients} clients, {args.rounds} rounds, inline backend\n")
    columns = ["run", "s / round", "vs plain", "bytes / client / round", "vs plain", "central acc"]
    print("| " + " | ".join([*columns, "max param diff", "survivors (last round)"]) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, seconds, ratio, nbytes, bratio, accuracy, diff, survivors in rows:
        print(
            f"| {name} | {seconds:.2f} | {ratio:.2f}x | {nbytes:,.0f} | {bratio:.2f}x | {accuracy:.4f} | {diff:.1e} "
            f"| {survivors:.0f} |"
        )
    return 0


def _central(data):  # type: ignore[no-untyped-def]
    test = data.central_test

    def accuracy(params):  # type: ignore[no-untyped-def]
        return job.task.evaluate(params, test).metrics["accuracy"]

    return accuracy


if __name__ == "__main__":
    raise SystemExit(main())
