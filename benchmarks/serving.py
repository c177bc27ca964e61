"""How many predictions ``fedloom serve`` answers per second, and are they the model's.

It simulates the digits quickstart (20 clients, 3 rounds), starts ``fedloom serve`` on the run, and sends from one
client over one keep-alive HTTP connection:

- 1,000 requests of one example each (the test set's 360 examples over and over), every answer checked against
  the model evaluated directly (``task.predict``), and the accuracy of the answers against ``task.evaluate``;
- requests of 1,024 examples each (the largest batch), as examples per second;
- as the references measured in the same run: ``GET /health`` on the same server (what HTTP and the server cost
  with no model), and ``task.predict`` called in process on one example (what the model costs with no HTTP).

    python benchmarks/serving.py [--requests 1000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np

import fedloom as fl

SERVING = re.compile(r"at http://127\.0\.0\.1:(\d+)/predict$")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    job = fl.load_job("digits")
    data = job.load_data(None)
    x_test, y_test = data.test.x.astype(np.float32), data.test.y
    with tempfile.TemporaryDirectory() as folder:
        simulation = replace(job.simulation, num_clients=20, rounds=3, backend=fl.BackendConfig("inline"))
        run = fl.simulate(job, simulation=simulation, runs_dir=folder)
        command = [sys.executable, "-c", "from fedloom.cli.main import main; main()"]
        server = subprocess.Popen(
            [*command, "serve", run.run_id, "--runs", folder, "--port", "0"], stdout=subprocess.PIPE, text=True
        )
        try:
            line = server.stdout.readline().strip() if server.stdout else ""
            found = SERVING.search(line)
            if not found:
                raise SystemExit(f"fedloom serve did not start: {line!r}")
            measure(int(found.group(1)), job, run, x_test, y_test, args.requests)
        finally:
            server.terminate()
            server.communicate(timeout=30)


def measure(port: int, job: fl.Job, run: fl.Run, x_test: np.ndarray, y_test: np.ndarray, requests: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}

    def post(instances: np.ndarray) -> dict:
        connection.request("POST", "/predict", json.dumps({"instances": instances.tolist()}), headers)
        answer = connection.getresponse()
        body = json.loads(answer.read())
        if answer.status != 200:
            raise SystemExit(f"{answer.status}: {body}")
        return body

    picks = np.arange(requests) % len(x_test)
    x, y = x_test[picks], y_test[picks]
    post(x[:1])  # warm up
    start = time.perf_counter()
    outputs = [post(x[i : i + 1])["outputs"][0] for i in range(requests)]
    single = requests / (time.perf_counter() - start)

    task = job.task
    expected = task.predict(run.params, x)  # type: ignore[attr-defined]
    difference = float(np.max(np.abs(np.array(outputs) - expected)))
    answered = np.argmax(np.array(outputs), axis=1)
    agree = int(np.sum(answered == np.argmax(expected, axis=1)))
    accuracy = float(np.mean(answered == y))
    evaluated = task.evaluate(run.params, fl.data.ArrayData(x, y)).metrics["accuracy"]

    batch = np.resize(x_test, (1024, x_test.shape[1])).astype(np.float32)
    rounds = 20
    start = time.perf_counter()
    for _ in range(rounds):
        post(batch)
    batched = rounds * len(batch) / (time.perf_counter() - start)

    start = time.perf_counter()
    for _ in range(requests):
        connection.request("GET", "/health")
        connection.getresponse().read()
    health = requests / (time.perf_counter() - start)

    start = time.perf_counter()
    for i in range(requests):
        task.predict(run.params, x[i : i + 1])  # type: ignore[attr-defined]
    direct = requests / (time.perf_counter() - start)
    connection.close()

    print(f"{requests} requests of one example each, over one keep-alive connection:")
    print(f"  answers equal to task.predict:       {agree}/{requests} classes, outputs within {difference:.1e}")
    print(f"  accuracy of the answers              {accuracy:.4f}  (task.evaluate: {evaluated:.4f})")
    print(f"  requests per second                  {single:9.1f}")
    print(f"  x GET /health on the same server     {single / health:9.3f}  ({health:.1f} requests/s)")
    print(f"  x task.predict in process, 1 example {single / direct:9.3f}  ({direct:.1f} calls/s)")
    print(f"requests of 1,024 examples: {batched:,.0f} examples per second ({batched / single:.0f}x one per request)")


if __name__ == "__main__":
    main()
