"""What a client's telemetry costs (fedloom.runtime.telemetry): system metrics, custom metrics and log lines.

Every instruction a client answers is measured (its seconds, CPU seconds, peak memory) and carries the lines it
logged; this times that against the same instruction answered bare, in the same run:

- per instruction, on a tiny fit (logistic regression on 8 examples: the worst case, where the fit itself costs
  almost nothing), with and without telemetry, and with a task that logs one INFO line and one custom metric;
- a whole simulation: the digits quickstart (20 clients) inline, where the difference is what a user sees.

    python benchmarks/telemetry.py [--repeats 2000]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

import fedloom
from fedloom.core.config import FitConfig
from fedloom.core.results import fit_message
from fedloom.data.base import ArrayData, ClientData
from fedloom.runtime import Context, client_app, handle_instruction, telemetry
from fedloom.task import LogisticRegressionTask

TASK = LogisticRegressionTask(num_features=4, num_classes=2)
log = logging.getLogger("benchmark")


class Talking:
    """The tiny task, logging a line and a custom metric in each fit."""

    def init_params(self, seed: int):  # type: ignore[no-untyped-def]
        return TASK.init_params(seed)

    def fit(self, params, data, config, **kwargs):  # type: ignore[no-untyped-def]
        log.info("fit on %d examples", len(data))
        fedloom.context.log_metric("examples", len(data))
        return TASK.fit(params, data, config, **kwargs)

    def evaluate(self, params, data):  # type: ignore[no-untyped-def]
        return TASK.evaluate(params, data)


def per_call(action: Callable[[], object], repeats: int) -> float:
    """Median microseconds per call over 5 batches of ``repeats`` calls."""
    for _ in range(100):
        action()
    batches = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            action()
        batches.append((time.perf_counter() - start) / repeats * 1e6)
    return statistics.median(batches)


def bare(task: object, data: ClientData, message: fedloom.Message) -> Callable[[], object]:
    """The instruction answered without telemetry: the task's handler alone, with no Measure mod around it."""
    return lambda: handle_instruction(task, data, message)  # type: ignore[arg-type]


def simulation_seconds(mode: str) -> float:
    """Seconds of the digits quickstart inline: ``bare`` (telemetry switched off), ``telemetry`` (as shipped),
    ``talking`` (each fit also logs a line and a metric)."""
    job = fedloom.load_job("digits")
    if mode == "talking":
        job = replace(job, task=_Wrapped(job.task))
    sim = replace(job.simulation, num_clients=20, rounds=5, backend=fedloom.BackendConfig("inline"))
    switch = telemetry.active
    if mode == "bare":
        telemetry.active = lambda: True  # type: ignore[assignment]  # the Measure mod measures nothing
    try:
        with tempfile.TemporaryDirectory() as runs:
            start = time.perf_counter()
            fedloom.simulate(job, simulation=sim, runs_dir=runs)
            return time.perf_counter() - start
    finally:
        telemetry.active = switch  # type: ignore[assignment]


class _Wrapped:
    def __init__(self, inner: object) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def fit(self, params, data, config, **kwargs):  # type: ignore[no-untyped-def]
        log.info("fit on %d examples", len(data))
        fedloom.context.log_metric("examples", len(data))
        return self.inner.fit(params, data, config, **kwargs)  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.INFO)  # as under the fedloom command: INFO records are made
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    data = ClientData(ArrayData(x, rng.integers(0, 2, 8)), ArrayData(x[:2], rng.integers(0, 2, 2)))
    message = fit_message(1, TASK.init_params(0), FitConfig(local_epochs=1, batch_size=8, lr=0.1))

    reference = per_call(bare(TASK, data, message), args.repeats)
    context = Context("site", data)
    measured = per_call(lambda: client_app(TASK)(message, context), args.repeats)
    talking = per_call(lambda: client_app(Talking())(message, context), args.repeats)
    print(f"per instruction, tiny fit (8 examples), median of 5 x {args.repeats}:")
    print(f"  bare (reference)                     {reference:8.1f} us")
    print(f"  with telemetry                       {measured:8.1f} us  +{measured - reference:.1f} us")
    print(f"  with telemetry, a line and a metric  {talking:8.1f} us  +{talking - reference:.1f} us")

    modes = ("bare", "telemetry", "talking")
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(5):  # interleaved, so that a busy moment of the machine does not fall on one mode only
        for mode in modes:
            times[mode].append(simulation_seconds(mode))
    seconds = {mode: min(found) for mode, found in times.items()}
    base = seconds["bare"]
    print("digits quickstart, 20 clients x 5 rounds, inline (best of 5, interleaved):")
    print(f"  telemetry off (reference)             {base:6.2f} s")
    print(f"  telemetry on (as shipped)             {seconds['telemetry']:6.2f} s  x{seconds['telemetry'] / base:.3f}")
    print(f"  each fit logging a line and a metric  {seconds['talking']:6.2f} s  x{seconds['talking'] / base:.3f}")


if __name__ == "__main__":
    main()
