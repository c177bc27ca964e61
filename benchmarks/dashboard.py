"""How fast the dashboard opens a long run: 1,000 rounds x 100 clients (200,000 client records).

It records such a run through the real RunRecorder (every client fits and evaluates every round, about 10% of
fits dropped, with system metrics), starts ``fedloom ui`` on it, and opens its pages in headless Chromium (Debian's,
through Playwright), timing from navigation to the page's own "everything drawn" mark:

- the run page right after the dashboard starts, while its background warm-up is still aggregating (the worst a
  user sees), then warm (median of 5 loads), with the time to the first content (summary, charts) and to
  everything (heat map, participation, profile, tables);
- the run list, a client's page, and the compare page of this run against a second one as long;
- as the reference measured in the same run, the bare cost of loading a page: the dashboard's static page with
  one tiny request (an unknown run, answered 404 at once), so the ratio says what the run's data adds.

Each API answer is also timed uncached (computed from the database, as the first request after a round pays).

    python benchmarks/dashboard.py [--rounds 1000] [--clients 100] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from fedloom.core.params import Params
from fedloom.runtime.records import ClientRecord, RoundRecord
from fedloom.tracking import RunStore, views
from fedloom.tracking.recorder import RunRecorder

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TARGET_S = 1.0


def record(root: Path, name: str, rounds: int, clients: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    recorder = RunRecorder.create(
        root, name, {"strategy": {"type": "FedAvg"}, "simulation": {"num_clients": clients, "seed": seed}}
    )
    params = Params({"w": np.zeros(10, np.float32)})
    for r in range(1, rounds + 1):
        records = []
        for c in range(clients):
            cid = f"client-{c:03d}"
            ok = rng.random() > 0.1
            system = {"sys_peak_rss_mb": 300 + 50 * rng.random(), "sys_cpu_seconds": 0.1 * rng.random()} if ok else {}
            records.append(
                ClientRecord(
                    cid,
                    "fit",
                    "ok" if ok else "dropped",
                    50,
                    float(rng.random()) if ok else None,
                    None,
                    0.1,
                    10_000,
                    10_000 if ok else 0,
                    system,
                )
            )
            records.append(
                ClientRecord(cid, "evaluate", "ok", 10, float(rng.random()), float(rng.random()), 0.01, 10_000, 100)
            )
        metrics = {
            "fit_loss": 1 / r,
            "central_accuracy": 1 - 1 / (r + 1),
            "central_loss": 1 / r,
            "federated_accuracy": 1 - 1 / (r + 2),
        }
        recorder.on_round(RoundRecord(r, metrics, tuple(records), 0.5), params)
    recorder.finish(params)
    return recorder.run_dir.name


def uncached(root: Path, ref: str, other: str) -> dict[str, float]:
    store = RunStore(root)
    timings = {}
    for label, call in {
        "/api/runs": lambda: [views.overview(store, info) for info in store.list_runs()],
        "/api/runs/RUN": lambda: views.run_detail(store, ref),
        "/api/runs/RUN/clients": lambda: views.clients_view(store, ref),
        "/api/runs/RUN/heatmap": lambda: views.heatmap(store, ref, "accuracy"),
        "/api/runs/RUN/profile": lambda: views.profile(store, ref),
        "/api/runs/RUN/clients/CLIENT": lambda: views.client_detail(store, ref, "client-007"),
        "/api/compare": lambda: views.compare_view(store, [ref, other]),
    }.items():
        start = time.perf_counter()
        call()
        timings[label] = time.perf_counter() - start
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        start = time.perf_counter()
        ref = record(root, "long", args.rounds, args.clients, 0)
        other = record(root, "long-again", args.rounds, args.clients, 1)
        print(
            f"recorded 2 runs of {args.rounds} rounds x {args.clients} clients in {time.perf_counter() - start:.1f} s"
        )
        for label, seconds in uncached(root, ref, other).items():
            print(f"uncached {label:32s} {seconds:6.3f} s")

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)

            def load(url: str) -> tuple[float, dict[str, float]]:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                begin = time.perf_counter()
                page.goto(url)
                page.wait_for_selector("body[data-ready]", timeout=60_000)
                total = time.perf_counter() - begin
                marks = page.evaluate("window.fedloomTimings")
                page.close()
                return total, marks

            command = [
                sys.executable,
                "-c",
                "from fedloom.cli.main import main; main()",
                "ui",
                "--runs",
                str(root),
                "--port",
                "0",
            ]
            server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            try:
                assert server.stdout is not None
                address = server.stdout.readline().split(" at ")[-1].strip()
                while True:
                    try:
                        urllib.request.urlopen(address + "static/style.css", timeout=5).close()
                        break
                    except OSError:
                        time.sleep(0.05)
                first, first_marks = load(f"{address}#/run/{ref}")
                print(
                    f"run page, right after start (warm-up racing): {first:.3f} s "
                    f"(first content {first_marks.get('content', 0) / 1000:.3f} s)"
                )
                loads = [load(f"{address}#/run/{ref}") for _ in range(5)]
                warm = statistics.median(t for t, _ in loads)
                content = statistics.median(m["content"] / 1000 for _, m in loads)
                bare = statistics.median(load(f"{address}#/run/no-such-run")[0] for _ in range(5))
                listing = statistics.median(load(f"{address}#/")[0] for _ in range(5))
                client = statistics.median(load(f"{address}#/run/{ref}/client/client-007")[0] for _ in range(5))
                compare = statistics.median(load(f"{address}#/compare/{ref},{other}")[0] for _ in range(3))
            finally:
                server.terminate()
                server.wait(timeout=10)
                browser.close()

    print(f"\nreference: a bare page load (the page and one 404): {bare:.3f} s")
    for label, seconds in (
        ("run page, warm", warm),
        ("run page, first content", content),
        ("run list", listing),
        ("client page", client),
        ("compare (2 long runs)", compare),
        ("run page, right after start", first),
    ):
        ratio, target = seconds / bare, seconds / TARGET_S
        print(f"{label:30s} {seconds:6.3f} s   {ratio:5.1f}x a bare page   {target:5.2f} of the 1 s target")


if __name__ == "__main__":
    main()
