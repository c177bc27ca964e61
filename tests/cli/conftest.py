"""Fixtures for the command-line tests: they run the real ``fedloom`` console script in a subprocess.

Every command runs in one temporary folder, with ``FEDLOOM_CACHE`` inside it and ``FEDLOOM_DATA`` unset, and
with every HTTP(S) proxy pointed at a closed local port: a loader that tries to download fails at once instead
of reaching the internet. The console script takes about two seconds to start, so fixtures that need several
independent commands start them together (:meth:`Cli.run_all`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

TIMEOUT_S = 120
# Rich wraps and truncates at 80 columns when its output is not a terminal (the width tests check output
# holds up there), so the tests give it a wide one unless they are about the width.
WIDE_COLUMNS = "250"
# A closed port on this machine: connecting to it is refused at once.
NO_NETWORK_PROXY = "http://127.0.0.1:9"
_PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
_UNSET_VARS = ("FEDLOOM_DATA", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "no_proxy", "NO_PROXY")
# Simulations are CPU-bound; a few at a time keeps a 2-core machine busy without thrashing it.
_PARALLEL = max(2, min(4, os.cpu_count() or 2))

SHA256_LINE = re.compile(r"^params_sha256 ([0-9a-f]{64})$", re.MULTILINE)
RUN_DIR_LINE = re.compile(r"^run directory (\S+)$", re.MULTILINE)


def fedloom_command() -> list[str]:
    """The ``fedloom`` console script of this interpreter's environment (so a version manager's shim earlier on
    PATH is not needed), else the one on PATH, else the same entry point through ``python -c``."""
    beside = Path(sys.executable).with_name("fedloom")
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("fedloom")
    if found is not None:
        return [found]
    return [sys.executable, "-c", "from fedloom.cli.main import main; main()"]


@dataclass(frozen=True)
class CliResult:
    """What one command did: its arguments, exit code and output."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"$ fedloom {' '.join(self.args)}\n[exit code {self.returncode}]\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )

    def ok(self) -> CliResult:
        """Assert that the command succeeded without a traceback; return the result for chaining."""
        assert self.returncode == 0, self
        assert "Traceback" not in self.stderr, self
        return self

    def error(self) -> str:
        """Assert that the command failed as fedloom's errors should (exit code 2, no traceback, exactly one
        ``error: ...`` line on stderr) and return the message after ``error: ``."""
        assert self.returncode == 2, self
        assert "Traceback" not in self.stderr, self
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1, self
        assert lines[0].startswith("error: "), self
        return lines[0].removeprefix("error: ")

    def run_dir(self, cwd: Path) -> Path:
        """The run directory that a successful ``simulate`` printed."""
        found = RUN_DIR_LINE.search(self.stdout)
        assert found is not None, self
        return cwd / found.group(1)

    def params_sha256(self) -> str:
        """The final ``params_sha256`` that ``simulate`` printed."""
        found = SHA256_LINE.findall(self.stdout)
        assert len(found) == 1, self
        return str(found[0])


class Cli:
    """Runs ``fedloom`` commands in ``cwd`` with a hermetic environment."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        env = {k: v for k, v in os.environ.items() if k not in _UNSET_VARS}
        env.update(dict.fromkeys(_PROXY_VARS, NO_NETWORK_PROXY))
        env.update(FEDLOOM_CACHE=str(cwd / "cache"), COLUMNS=WIDE_COLUMNS, NO_COLOR="1", PYTHONIOENCODING="utf-8")
        self.env = env
        self._pool = ThreadPoolExecutor(max_workers=_PARALLEL, thread_name_prefix="fedloom-cli")

    def start(self, *args: str | Path, env: Mapping[str, str] | None = None) -> Future[CliResult]:
        """Start ``fedloom ARGS`` in the background (``env`` adds to or overrides the environment)."""
        return self._pool.submit(self._run, fedloom_command(), [str(a) for a in args], env)

    def run(self, *args: str | Path, env: Mapping[str, str] | None = None) -> CliResult:
        """Run ``fedloom ARGS`` and wait for it."""
        return self.start(*args, env=env).result()

    def run_all(self, commands: Mapping[str, Sequence[str | Path]]) -> dict[str, CliResult]:
        """Run independent commands a few at a time; their results keyed like ``commands``."""
        futures = {name: self.start(*args) for name, args in commands.items()}
        return {name: future.result() for name, future in futures.items()}

    def run_python(self, code: str) -> CliResult:
        """Run ``python -c CODE`` with the same folder and environment."""
        return self._pool.submit(self._run, [sys.executable, "-c", code], [], None).result()

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)

    def _run(self, command: list[str], args: list[str], env: Mapping[str, str] | None) -> CliResult:
        completed = subprocess.run(
            [*command, *args],
            cwd=self.cwd,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=TIMEOUT_S,
            check=False,
        )
        return CliResult(tuple(args), completed.returncode, completed.stdout, completed.stderr)


@pytest.fixture(scope="session")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    """A :class:`Cli` whose commands run in one temporary folder shared by the CLI tests."""
    runner = Cli(tmp_path_factory.mktemp("cli"))
    yield runner
    runner.close()


DIGITS = ("simulate", "digits", "--clients", "5", "--rounds", "2")


@pytest.fixture(scope="session")
def digits_runs(cli: Cli) -> dict[str, CliResult]:
    """Small digits runs, each in its own runs folder, started together. ``happy`` is the only run in
    ``runs/``; ``seed7_again`` repeats it; the others change flags."""
    return cli.run_all(
        {
            "happy": [*DIGITS, "--seed", "7", "--out", "runs"],
            "seed7_again": [*DIGITS, "--seed", "7", "--out", "runs_seed7"],
            "seed8_quiet": [*DIGITS, "--seed", "8", "--quiet", "--out", "runs_seed8"],
            "flags": [
                *DIGITS,
                *("--partition", "iid", "--alpha", "0.3", "--lr", "0.05", "--local-steps", "3"),
                *("--batch-size", "8", "--fraction", "0.4", "--min-clients", "2", "--seed", "1"),
                *("--out", "runs_flags"),
            ],
            "fedadam": [
                *DIGITS,
                *("--strategy", "fedadam", "--strategy-arg", "eta=0.05", "--strategy-arg", "tau=0.01"),
                *("--lr", "0.05", "--seed", "7", "--out", "runs_fedadam"),
            ],
            "fedbuff": [
                *DIGITS,
                *("--strategy", "fedbuff", "--strategy-arg", "buffer_size=2", "--strategy-arg", "concurrency=3"),
                *("--speed-spread", "10", "--seed", "7", "--out", "runs_fedbuff"),
            ],
            "secagg": [*DIGITS, "--secagg", "--seed", "7", "--out", "runs_secagg"],
            "paillier": [*DIGITS, "--paillier", "--paillier-bits", "1024", "--seed", "7", "--out", "runs_paillier"],
            # epsilon 2.74 after one round and 3.95 after two (z = 1.5, q = 0.8, delta 1e-5): the target stops it
            "dp": [
                *DIGITS,
                *("--fraction", "0.8", "--dp-noise", "1.5", "--dp-clip", "0.2", "--dp-target-epsilon", "3.5"),
                *("--seed", "7", "--out", "runs_dp"),
            ],
            "dropout": [
                *("simulate", "digits", "--clients", "10", "--rounds", "2", "--dropout", "0.3", "--min-clients", "1"),
                *("--partition", "shards", "--shards", "3", "--local-epochs", "1", "--seed", "3", "--out", "runs_drop"),
            ],
        }
    )


@pytest.fixture(scope="session")
def digits_run(digits_runs: dict[str, CliResult]) -> CliResult:
    """``fedloom simulate digits --clients 5 --rounds 2 --seed 7 --out runs``."""
    return digits_runs["happy"].ok()
