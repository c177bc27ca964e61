"""``fedloom ui`` as a real process on a free loopback port, for the browser and command-line tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Where the browser tests leave their screenshots (one PNG per main view); the CI log names the folder.
SCREENSHOTS = Path(
    os.environ.get("FEDLOOM_SCREENSHOTS", Path(__file__).resolve().parents[2] / "artifacts" / "screenshots")
)
START_TIMEOUT_S = 60
ADDRESS = re.compile(r"at (http://127\.0\.0\.1:\d+/)(\?token=\S+)?")
COMMAND = [sys.executable, "-c", "from fedloom.cli.main import main; main()"]


@contextmanager
def dashboard(runs: Path, *extra: str) -> Iterator[str]:
    """Start ``fedloom ui --runs RUNS --port 0 EXTRA...``, wait until it answers, yield its address, stop it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    process = subprocess.Popen(
        [*COMMAND, "ui", "--runs", str(runs), "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        found = ADDRESS.search(line)
        assert found is not None, line + process.stdout.read()
        address = found.group(1)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(address + "static/style.css", timeout=5):
                    break
            except urllib.error.HTTPError as refused:
                refused.close()
                break  # it answers (a token-protected dashboard answers 401)
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.1)
        yield address
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
