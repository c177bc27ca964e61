"""``fedloom simulate JOB --topology ...``: decentralized runs through the real console script."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Cli, CliResult

# Every test here runs the fedloom console script in a subprocess (tests/cli/conftest.py).
pytestmark = pytest.mark.integration

GOSSIP = ("simulate", "digits", "--clients", "4", "--rounds", "2", "--seed", "3")

# id -> (arguments after ``fedloom``, words the one error line must contain)
ERRORS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "with_strategy": (
        (*GOSSIP, "--topology", "ring", "--strategy", "fedadam"),
        ("--topology runs the job decentralized", "--strategy cannot be used with it"),
    ),
    "with_attack": ((*GOSSIP, "--topology", "full", "--attack", "scale:0.5"), ("--attack cannot be used with it",)),
    "degree_without_topology": ((*GOSSIP, "--degree", "3"), ("--degree needs --topology regular",)),
    "unknown_topology": (
        (*GOSSIP, "--topology", "star"),
        ("unknown topology 'star'; choose one of ring, regular, full",),
    ),
    "regular_without_degree": ((*GOSSIP, "--topology", "regular"), ("the regular topology needs a degree",)),
}


@pytest.fixture(scope="module")
def gossip_runs(cli: Cli) -> dict[str, CliResult]:
    """A quiet ring run, a ring run, and every case of :data:`ERRORS` (each found before the job is loaded, so
    they end quickly), started together."""
    commands: dict[str, list[str]] = {name: list(args) for name, (args, _) in ERRORS.items()}
    commands["ring"] = [*GOSSIP, "--topology", "ring", "--out", "runs_gossip"]
    return cli.run_all(commands)


def test_gossip_prints_a_line_per_round_and_a_final_table(cli: Cli, gossip_runs: dict[str, CliResult]) -> None:
    result = gossip_runs["ring"].ok()
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "fedloom: job digits, 4 clients, 2 rounds, partition dirichlet, seed 3, gossip on a ring topology "
        "(no server, not recorded)"
    )
    rounds = [line for line in lines if line.startswith("round ")]
    assert [line.split("  ")[0] for line in rounds] == ["round 1/2", "round 2/2"]
    assert all(re.search(r"client_acc \d\.\d{4}.*acc \d\.\d{4}.*consensus \S+", line) for line in rounds), rounds
    for row in ("spectral gap", "mean client accuracy", "average model's central accuracy", "consensus distance"):
        assert re.search(rf"{re.escape(row)}.*│\s+\d", result.stdout), row
    assert "not recorded in the run store" in result.stdout
    assert not (cli.cwd / "runs_gossip").exists()  # nothing recorded


@pytest.mark.parametrize("case", ERRORS)
def test_bad_gossip_input_ends_with_one_error_line(case: str, gossip_runs: dict[str, CliResult]) -> None:
    message = gossip_runs[case].error()
    for words in ERRORS[case][1]:
        assert words in message
