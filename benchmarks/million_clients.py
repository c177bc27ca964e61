"""A million registered clients, 1,000 sampled per round: seconds per round and peak memory.

    python benchmarks/million_clients.py [--backend inline|vectorized] [--clients 1000000] [--rounds 10]

Runs the ``cross_device`` example job (``examples/cross_device.py``): its task, strategy and systems model
(availability, client speeds, deadline) over a lazily materialized digits population, with the server loop
``run_rounds`` over ``SystemGrid(<backend>)`` and central evaluation on the digits test split. Prints one line
per round (wall and CPU seconds; simulated start and duration; online, asked, late and dropped clients; central
accuracy), then the peak resident memory of the process against the 2 GiB bound of the acceptance test.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import fedloom as fl
from fedloom.data.lazy import digits_population
from fedloom.runtime import Grid, RoundRecord, run_rounds
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.runtime.sim.crossdevice import SystemGrid
from fedloom.runtime.sim.inline import InlineGrid

REPO = Path(__file__).resolve().parents[1]
BOUND_MIB = 2048


def peak_rss_mib() -> float:
    """The process's peak resident set size so far (``ru_maxrss`` is in KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def backend_grid(name: str, task: fl.Task, data: Any, seed: int) -> Grid:
    """The simulation grid that trains the sampled clients; the vectorized one is imported only when asked for."""
    if name == "inline":
        return InlineGrid(SimulatedClients.of(task, data))
    from fedloom.runtime.sim.vectorized import VectorizedGrid  # optional: needs torch.func

    grid: Grid = VectorizedGrid(SimulatedClients.of(task, data))
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("inline", "vectorized"), default="inline")
    parser.add_argument("--clients", type=int, default=1_000_000, help="registered clients")
    parser.add_argument("--per-round", type=int, default=1000, help="clients sampled per round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: a 64-32-10 MLP gains nothing from more, and more "
        "threads spin against other load on the machine)",
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    job = fl.load_job(str(REPO / "examples" / "cross_device.py"))
    strategy = dataclasses.replace(job.strategy, clients_per_round=args.per_round)
    system = job.simulation.system
    print(
        f"# Python {platform.python_version()} on {platform.machine()}, backend {args.backend}, "
        f"{args.threads} torch thread(s); {system}"
    )
    print(f"# after imports: peak RSS {peak_rss_mib():.0f} MiB")

    started = time.perf_counter()
    data = digits_population(args.clients, seed=args.seed)
    built = time.perf_counter()
    grid = SystemGrid(backend_grid(args.backend, job.task, data, args.seed), data, system, seed=args.seed)
    print(
        f"# {len(data.client_ids):,} clients registered in {built - started:.2f} s (loading the digits included); "
        f"grid ready in {time.perf_counter() - built:.2f} s; peak RSS {peak_rss_mib():.0f} MiB"
    )
    central = data.central_test
    assert central is not None

    cpu_seconds: list[float] = []

    class Progress:
        """Prints each round; CPU seconds are this process's, which other load on the machine does not inflate."""

        last_cpu = time.process_time()

        def on_round(self, record: RoundRecord, params: fl.Params) -> None:
            now = time.process_time()
            cpu_seconds.append(now - self.last_cpu)
            self.last_cpu = now
            facts = grid.history[-1]
            print(
                f"round {record.server_round:2d}: {record.seconds:6.2f} s (CPU {cpu_seconds[-1]:5.2f} s)  "
                f"sim t={facts.start:6.2f}+{facts.duration:.2f} s  online {facts.online:,}  asked {facts.asked}  "
                f"late {facts.late}  dropped {facts.dropped}  "
                f"central acc {record.metrics['central_accuracy']:.3f}  peak RSS {peak_rss_mib():.0f} MiB",
                flush=True,
            )

    result = run_rounds(
        strategy=strategy,
        grid=grid,
        initial_params=job.task.init_params(args.seed),
        rounds=args.rounds,
        seed=args.seed,
        evaluate_central=lambda params: job.task.evaluate(params, central),
        observers=[Progress()],
    )
    seconds = [r.seconds for r in result.history]
    peak = peak_rss_mib()
    print(
        f"seconds per round: mean {sum(seconds) / len(seconds):.2f}, min {min(seconds):.2f}, max {max(seconds):.2f} "
        f"(CPU mean {sum(cpu_seconds) / len(cpu_seconds):.2f}); "
        f"simulated clock {grid.clock:.2f} s; final central accuracy "
        f"{result.history[-1].metrics['central_accuracy']:.3f}"
    )
    print(f"peak RSS {peak:.0f} MiB (bound {BOUND_MIB} MiB): {'ok' if peak < BOUND_MIB else 'EXCEEDED'}")


if __name__ == "__main__":
    main()
