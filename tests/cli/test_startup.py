"""The command line starts light: its help pages, and the commands that only read or write a few small files,
import none of the stacks that other commands load when they run (torch, gRPC, FastAPI, SQLAlchemy, Ray,
numpy). Asserted on the modules a fresh interpreter has imported, never on seconds, which a loaded machine
makes flaky."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import fedloom.cli.choices as choices

pytestmark = pytest.mark.integration  # fresh interpreters

HEAVY = ("torch", "grpc", "fastapi", "sqlalchemy", "ray", "numpy")

HELP_PAGES = [
    ["--help"],
    *([command, "--help"] for command in ("simulate", "partition", "server", "client", "invite", "report", "ui")),
    *([command, "--help"] for command in ("serve", "export", "runs", "certs", "token", "privacy", "ledger")),
    ["runs", "list", "--help"],
    ["certs", "init", "--help"],
    ["token", "create", "--help"],
    ["privacy", "epsilon", "--help"],
]

# Runs each command of argv lists (JSON on stdin) in this interpreter and prints the heavy modules imported then.
_PROBE = """
import json, sys
from typer.testing import CliRunner
from fedloom.cli.main import app

runner = CliRunner()
for args in json.load(sys.stdin):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (args, result.output, result.exception)
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in {heavy})))
"""


def imported_by(commands: list[list[str]], cwd: Path) -> list[str]:
    """The heavy modules a fresh interpreter has imported after running ``commands`` (``fedloom`` argv lists)."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=repr(set(HEAVY)))],
        input=json.dumps(commands),
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return sorted({name.split(".")[0] for name in json.loads(done.stdout)})


def test_help_pages_import_no_heavy_module(tmp_path: Path):
    assert imported_by(HELP_PAGES, tmp_path) == []


def test_light_commands_import_only_what_they_use(tmp_path: Path):
    # Listing runs needs SQLAlchemy and nothing else; a token, SQLAlchemy and numpy (the site name's check).
    assert imported_by([["runs", "list", "--runs", "runs"]], tmp_path) == ["sqlalchemy"]
    assert imported_by([["token", "create", "site-a", "--run-dir", "fed"]], tmp_path) == ["numpy", "sqlalchemy"]
    assert (tmp_path / "fed" / "run.db").is_file()
    # Certificates need the cryptography package; the accountant its own; neither needs torch, gRPC or a database.
    certs = ["certs", "init", "--out", "certs", "--host", "127.0.0.1"]
    assert set(imported_by([certs], tmp_path)) <= {"numpy"}
    assert (tmp_path / "certs" / "ca.pem").is_file()
    accounting = ["privacy", "epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--rounds", "3"]
    assert set(imported_by([[*accounting, "--delta", "1e-5"]], tmp_path)) <= {"numpy"}


def test_import_fedloom_is_light_and_its_names_load_on_first_use():
    loaded = f"sorted(m for m in {set(HEAVY)!r} if m in sys.modules)"
    code = f"import sys, json, fedloom\nbefore = {loaded}\nfedloom.Params, fedloom.simulate\n"
    code += f"print(json.dumps([before, {loaded}]))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    before, after = json.loads(done.stdout)
    assert before == []
    assert "numpy" in after
    assert "grpc" not in after  # a simulation does not load the transport


def test_the_names_in_the_help_are_the_librarys():
    from fedloom.core.graphs import TOPOLOGIES
    from fedloom.privacy.accounting import ACCOUNTANTS
    from fedloom.strategy.catalog import STRATEGIES

    assert tuple(STRATEGIES) == choices.STRATEGY_NAMES
    assert TOPOLOGIES == choices.TOPOLOGIES
    assert ACCOUNTANTS == choices.ACCOUNTANTS
