"""The strategy library's acceptance experiments, each against FedAvg on the same data, seeds and budget.

    python benchmarks/algorithms.py synthetic [--seeds 3] [--rounds 60] [--stragglers]
    python benchmarks/algorithms.py heart [--data DIR] [--seeds 5]
    python benchmarks/algorithms.py robust [--clients 50] [--attackers 0.2] [--scale -10] [--partition iid]
    python benchmarks/algorithms.py personal [--clients 20] [--seeds 3] [--rounds 30]
    python benchmarks/algorithms.py async [--clients 100] [--spread 10] [--target 0.9] [--seeds 3]

- ``synthetic``: FedProx's synthetic(1, 1), 30 devices, 10 per round, multinomial logistic regression,
  E = 20 local epochs over devices of very unequal sizes (so 100 to 1600 local steps), then again with
  FedProx's stragglers on top (each sampled device runs 1 to 20 epochs, ``work_range``). FedAvg, FedProx
  (mu = 1) and SCAFFOLD; the number is the training loss of the final global model over all devices' training
  data (FedProx's measure), example-weighted, mean over seeds.
- ``heart``: UCI Heart Disease's 4 hospitals (the ``heart_disease`` job, FLamby's budget): FedAvg, FedAdam and
  FedYogi; the number is FLamby's, the unweighted mean over hospitals of each one's test accuracy.
- ``robust``: the ``digits`` job with 50 clients, all training every round, 20% of which send their update
  scaled by -10; FedAvg and the robust rules, with and without the attack; central test accuracy. The job's
  Dirichlet(0.5) partition by default; ``--partition iid`` is the setting of Krum's and Yin et al.'s papers.
- ``personal``: the ``digits`` job over 20 clients in McMahan et al.'s pathological shards (2 shards of the
  label-sorted data per client, so most clients see two digits), all training every round; the global FedAvg
  model against local fine-tuning, FedPer, FedRep and Ditto. The number is the mean over the clients of each
  one's accuracy on its own test split (its 20% holdout, the same two digits) with the model the strategy gives
  it: the global model, or its personalized one. (MNIST's 60,000 training images, which ``mnist_2nn`` needs,
  are not on the benchmark machine.)
- ``async``: the ``digits`` job over 100 clients (Dirichlet 0.5) whose speeds spread 10x (log-uniform,
  ``SystemConfig(speed_spread=10)``), 1 local epoch each. Synchronous FedAvg trains 10 clients a round and
  waits for the slowest; FedBuff keeps 10 clients training and updates the model every 5 replies. The number
  is the simulated time (``sim_seconds``) at which the central test accuracy first reaches the target, and
  the client trainings spent by then.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

import fedloom as fl
from fedloom.data import federate
from fedloom.strategy import FedAdam, FedAvg, FedBuff, FedProx, FedYogi, Krum, Median, Scaffold, TrimmedMean
from fedloom.strategy.personal import Ditto, FedPer, FedRep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_HEART = os.environ.get("FEDLOOM_DATA") or os.path.join(os.path.dirname(REPO), "shared", "data", "heart_disease")


def run(job: fl.Job, strategy: Any, seed: int, rounds: int, data_dir: str | None = None) -> fl.Run:
    """``job`` with ``strategy`` for ``rounds`` rounds under ``seed``, in a throwaway runs folder."""
    simulation = replace(job.simulation, seed=seed, rounds=rounds, data_dir=data_dir)
    with tempfile.TemporaryDirectory() as runs:
        return fl.simulate(replace(job, strategy=strategy), simulation=simulation, runs_dir=runs)


def table(rows: dict[str, list[float]], what: str, reference: str = "FedAvg", lower_is_better: bool = False) -> str:
    """A markdown table of mean ± std over seeds, each against the reference row."""
    ref = float(np.mean(rows[reference]))
    lines = [f"| strategy | {what} (mean ± std) | by seed | vs {reference} |", "|---|---:|---|---:|"]
    for name, values in rows.items():
        mean = float(np.mean(values))
        better = mean < ref if lower_is_better else mean > ref
        mark = "" if name == reference else (" better" if better else (" same" if mean == ref else " worse"))
        by_seed = ", ".join(f"{v:.4f}" for v in values)
        lines.append(f"| {name} | {mean:.4f} ± {np.std(values):.4f} | {by_seed} | {mean - ref:+.4f}{mark} |")
    return "\n".join(lines)


def synthetic(args: argparse.Namespace) -> None:
    job = fl.load_job("synthetic")
    fit = job.strategy.fit
    dataset = job.load_data(None)
    clients = federate(dataset, job.simulation.num_clients, job.simulation.partition, 0).clients
    sizes = [len(c.train) for c in clients.values()]
    epochs = fit.local_epochs or 20
    steps = [epochs * math.ceil(n / fit.batch_size) for n in sizes]
    settings = {
        # The devices hold 45 to 800 examples, so E = 20 epochs is 100 to 1600 local steps.
        f"unequal devices, E = {epochs}": {},
    }
    if args.stragglers:  # FedProx's stragglers on top: each sampled device runs 1 to E epochs, drawn every round
        settings[f"stragglers, E uniform in 1..{epochs}"] = {"work_range": (1, epochs)}
    print(
        f"synthetic(1,1): 30 devices of {min(sizes)}-{max(sizes)} examples, 10 per round, {args.rounds} rounds, {fit}"
    )
    print(f"local steps at E = {epochs}: {min(steps)} to {max(steps)}")
    for setting, extra in settings.items():
        common: dict[str, Any] = {"fraction": job.strategy.fraction, "fit": fit, **extra}
        strategies: dict[str, Callable[[], Any]] = {
            "FedAvg": lambda common=common: FedAvg(**common),
            "FedProx (mu=1)": lambda common=common: FedProx(mu=1.0, **common),
            "SCAFFOLD": lambda common=common: Scaffold(**common),
        }
        print(f"\n{setting}:")
        losses: dict[str, list[float]] = {name: [] for name in strategies}
        for seed in range(args.seeds):
            for name, make in strategies.items():
                params = run(job, make(), seed, args.rounds).params
                results = [job.task.evaluate(params, c.train) for c in clients.values()]
                loss = sum(r.loss * r.num_examples for r in results) / sum(r.num_examples for r in results)
                losses[name].append(loss if math.isfinite(loss) else float("inf"))
                print(f"  seed {seed} {name}: training loss {loss:.4f}", flush=True)
        print()
        print(table(losses, "training loss", lower_is_better=True))


def heart(args: argparse.Namespace) -> None:
    job = fl.load_job("heart_disease")
    dataset = job.load_data(args.data)
    clients = federate(dataset, job.simulation.num_clients, job.simulation.partition, 0).clients
    common: dict[str, Any] = {"fraction": 1.0, "min_clients": 4, "fit": job.strategy.fit}
    strategies: dict[str, Callable[[], Any]] = {
        "FedAvg": lambda: FedAvg(**common),
        f"FedAdam (eta={args.eta}, tau={args.tau})": lambda: FedAdam(eta=args.eta, tau=args.tau, **common),
        f"FedYogi (eta={args.eta}, tau={args.tau})": lambda: FedYogi(eta=args.eta, tau=args.tau, **common),
    }
    print(f"heart disease: 4 hospitals, {job.simulation.rounds} rounds, {job.strategy.fit}")
    accuracy: dict[str, list[float]] = {name: [] for name in strategies}
    for seed in range(args.seeds):
        for name, make in strategies.items():
            params = run(job, make(), seed, job.simulation.rounds, args.data).params
            per_center = [job.task.evaluate(params, c.test).metrics["accuracy"] for c in clients.values()]
            accuracy[name].append(float(np.mean(per_center)))
            print(f"  seed {seed} {name}: mean per-center accuracy {accuracy[name][-1]:.4f}", flush=True)
    print()
    print(table(accuracy, "mean per-center test accuracy"))


def robust(args: argparse.Namespace) -> None:
    job = fl.load_job("digits")
    attack = fl.AttackConfig("scale", fraction=args.attackers, scale=args.scale)
    partition = replace(job.simulation.partition, scheme=args.partition)
    base = replace(job.simulation, num_clients=args.clients, partition=partition, rounds=args.rounds)
    common: dict[str, Any] = {"fraction": 1.0, "fit": job.strategy.fit}
    f = int(args.attackers * args.clients)
    strategies: dict[str, Callable[[], Any]] = {
        "FedAvg": lambda: FedAvg(**common),
        "coordinate median": lambda: FedAvg(aggregator=Median(), **common),
        "trimmed mean (beta=0.2)": lambda: FedAvg(aggregator=TrimmedMean(beta=0.2), **common),
        f"Krum (f={f})": lambda: FedAvg(aggregator=Krum(f=f), **common),
        f"Multi-Krum (f={f}, m={args.clients - f})": lambda: FedAvg(aggregator=Krum(f=f, m=args.clients - f), **common),
    }
    print(
        f"digits: {args.clients} clients ({base.partition.scheme}), {base.rounds} rounds, all train each round, "
        f"{job.strategy.fit}; attack: {args.attackers:.0%} of the clients send global + {args.scale} x their update"
    )
    rows = []
    for name, make in strategies.items():
        accuracy = {}
        for label, attacks in (("no attack", ()), ("attack", (attack,))):
            values = []
            for seed in range(args.seeds):
                simulation = replace(base, seed=seed, attacks=attacks)
                with tempfile.TemporaryDirectory() as runs:
                    try:
                        done = fl.simulate(replace(job, strategy=make(), simulation=simulation), runs_dir=runs)
                    except fl.NotEnoughClientsError as exc:  # the model diverged: every update is non-finite
                        print(f"  {name}, {label}: diverged ({exc})", flush=True)
                        values.append(float("nan"))
                        continue
                values.append(done.final_metrics["central_accuracy"])
            accuracy[label] = float(np.mean(values))
            print(f"  {name}, {label}: central accuracy {accuracy[label]:.4f}", flush=True)
        rows.append((name, accuracy["no attack"], accuracy["attack"]))
    clean = rows[0][1]
    print()
    print("| aggregation | no attack | 20% scaled and negated | drop | vs FedAvg without attack |")
    print("|---|---:|---:|---:|---:|")
    for name, quiet, attacked in rows:
        drop, against = (quiet - attacked) * 100, (attacked - clean) * 100
        print(f"| {name} | {quiet:.4f} | {attacked:.4f} | {drop:+.1f} pts | {against:+.1f} pts |")


def personal(args: argparse.Namespace) -> None:
    job = fl.load_job("digits")
    fit = job.strategy.fit
    common: dict[str, Any] = {"fraction": 1.0, "fit": fit}
    strategies: dict[str, Callable[[], Any]] = {
        "FedAvg (global model)": lambda: FedAvg(**common),
        "FedAvg + local fine-tuning (1 epoch)": lambda: FedAvg(finetune=replace(fit, local_epochs=1), **common),
        "FedPer (last layer personal)": lambda: FedPer(**common),
        "FedRep (last layer, 1 head epoch)": lambda: FedRep(head_epochs=1, **common),
        f"Ditto (lam={args.lam})": lambda: Ditto(lam=args.lam, **common),
    }
    shards = fl.PartitionConfig(scheme="shards", shards_per_client=2)
    print(
        f"digits: {args.clients} clients, pathological shards (2 per client), all train each round, "
        f"{args.rounds} rounds, {fit}; every client evaluated on its own test split"
    )
    accuracy: dict[str, list[float]] = {name: [] for name in strategies}
    for seed in range(args.seeds):
        for name, make in strategies.items():
            started = time.perf_counter()
            simulation = replace(
                job.simulation, seed=seed, rounds=args.rounds, num_clients=args.clients, partition=shards
            )
            with tempfile.TemporaryDirectory() as runs:
                done = fl.simulate(replace(job, strategy=make(), simulation=simulation), runs_dir=runs)
            accuracy[name].append(done.final_metrics["client_mean_accuracy"])
            seconds = time.perf_counter() - started
            print(f"  seed {seed} {name}: mean client accuracy {accuracy[name][-1]:.4f} ({seconds:.0f} s)", flush=True)
    print()
    print(table(accuracy, "mean per-client test accuracy", reference="FedAvg (global model)"))


def asynchronous(args: argparse.Namespace) -> None:
    job = fl.load_job("digits")
    fit = replace(job.strategy.fit, local_epochs=1)
    system = fl.SystemConfig(speed_spread=args.spread)
    strategies: dict[str, tuple[Callable[[], Any], int]] = {  # the strategy, and its rounds (server updates)
        f"FedAvg ({args.cohort} clients a round, synchronous)": (
            lambda: FedAvg(clients_per_round=args.cohort, fraction_evaluate=0.0, fit=fit),
            args.rounds,
        ),
        f"FedBuff ({args.cohort} training, update every {args.buffer})": (
            lambda: FedBuff(concurrency=args.cohort, buffer_size=args.buffer, fraction_evaluate=0.0, fit=fit),
            args.rounds * args.cohort // args.buffer,
        ),
    }
    print(
        f"digits: {args.clients} clients (dirichlet 0.5), client speeds log-uniform over {args.spread:g}x, {fit}; "
        f"target central accuracy {args.target}; the same number of client trainings for both"
    )
    reached: dict[str, list[float]] = {name: [] for name in strategies}
    trainings: dict[str, list[float]] = {name: [] for name in strategies}
    for seed in range(args.seeds):
        for name, (make, rounds) in strategies.items():
            started = time.perf_counter()
            simulation = replace(job.simulation, seed=seed, rounds=rounds, num_clients=args.clients, system=system)
            with tempfile.TemporaryDirectory() as runs:
                done = fl.simulate(replace(job, strategy=make(), simulation=simulation), runs_dir=runs)
            hit = next((r for r in done.history if r.metrics["central_accuracy"] >= args.target), None)
            used = 0
            for record in done.history:
                used += sum(1 for c in record.clients if c.phase == "fit" and c.status == "ok")
                if record is hit:
                    break
            reached[name].append(hit.metrics["sim_seconds"] if hit is not None else math.inf)
            trainings[name].append(used)
            final = done.final_metrics
            print(
                f"  seed {seed} {name}: target at {reached[name][-1]:.2f} simulated s after {used} client replies; "
                f"final accuracy {final['central_accuracy']:.4f} at {final['sim_seconds']:.2f} s "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    reference = next(iter(strategies))
    ref = float(np.mean(reached[reference]))
    print()
    print(f"| run | simulated seconds to {args.target} (mean) | by seed | client replies by then | vs FedAvg |")
    print("|---|---:|---|---:|---:|")
    for name in strategies:
        mean = float(np.mean(reached[name]))
        by_seed = ", ".join(f"{v:.2f}" for v in reached[name])
        print(f"| {name} | {mean:.2f} | {by_seed} | {np.mean(trainings[name]):.0f} | {mean / ref:.2f}x |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="experiment", required=True)
    p = sub.add_parser("synthetic", help="FedProx and SCAFFOLD against FedAvg on synthetic(1,1)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--stragglers", action="store_true", help="also with FedProx's stragglers (1 to E epochs)")
    p = sub.add_parser("heart", help="FedAdam and FedYogi against FedAvg on the 4 heart disease hospitals")
    p.add_argument("--data", default=DEFAULT_HEART)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--eta", type=float, default=0.01, help="server learning rate")
    p.add_argument("--tau", type=float, default=1e-3, help="adaptivity")
    p = sub.add_parser("robust", help="robust aggregation against scaled-and-negated updates on digits")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--attackers", type=float, default=0.2, help="share of clients that attack")
    p.add_argument("--scale", type=float, default=-10.0, help="the attackers send global + scale * update")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--partition", default="dirichlet", help="dirichlet (0.5, the digits job's) or iid")
    p.add_argument("--rounds", type=int, default=30)
    p = sub.add_parser("personal", help="personalization against the global model on pathological digits shards")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--lam", type=float, default=0.1, help="Ditto's lambda")
    p = sub.add_parser("async", help="FedBuff against synchronous FedAvg in simulated time, speeds spread 10x")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--spread", type=float, default=10.0, help="fastest client speed over the slowest")
    p.add_argument("--target", type=float, default=0.9, help="central test accuracy to reach")
    p.add_argument("--cohort", type=int, default=10, help="clients training at once")
    p.add_argument("--buffer", type=int, default=5, help="FedBuff's updates per server step")
    p.add_argument("--rounds", type=int, default=60, help="FedAvg's rounds; FedBuff gets as many client trainings")
    p.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    print("$ python benchmarks/algorithms.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}")
    experiments = {"synthetic": synthetic, "heart": heart, "robust": robust, "personal": personal}
    experiments["async"] = asynchronous
    experiments[args.experiment](args)
    print(f"runtime: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
