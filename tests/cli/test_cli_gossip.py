"""``fedloom simulate JOB --topology ...``: decentralized runs through the real console script, recorded in the
runs folder where ``fedloom runs`` and ``fedloom report`` find them."""

from __future__ import annotations

import json
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
        "fedloom: job digits, 4 clients, 2 rounds, partition dirichlet (alpha 0.5), seed 3, gossip on a ring topology "
        "(no server)"
    )
    rounds = [line for line in lines if line.startswith("round ")]
    assert [line.split("  ")[0] for line in rounds] == ["round 1/2", "round 2/2"]
    assert all(re.search(r"client_acc \d\.\d{4}.*acc \d\.\d{4}.*consensus \S+", line) for line in rounds), rounds
    for row in ("spectral gap", "mean client accuracy", "average model's central accuracy", "consensus distance"):
        assert re.search(rf"{re.escape(row)}.*│\s+\d", result.stdout), row
    finished = re.search(r"^finished run (\S+) \(its checkpoints and params_sha256 are", result.stdout, re.MULTILINE)
    assert finished is not None, result
    run_dir = result.run_dir(cli.cwd)
    assert run_dir == cli.cwd / "runs_gossip" / finished.group(1)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["params_sha256"]) == ("finished", result.params_sha256())
    assert (summary["config"]["strategy"]["type"], summary["config"]["strategy"]["topology"]) == ("Gossip", "ring")


def test_runs_and_report_show_a_gossip_run(cli: Cli, gossip_runs: dict[str, CliResult]) -> None:
    result = gossip_runs["ring"].ok()
    run_id = result.run_dir(cli.cwd).name
    in_runs = ("--runs", "runs_gossip")
    shown = cli.run_all(
        {
            "list": ["runs", "list", *in_runs],
            "show": ["runs", "show", run_id, *in_runs],
            "report": ["report", run_id, "--out", "gossip.html", *in_runs],
        }
    )
    listed = shown["list"].ok().stdout
    assert run_id in listed
    assert " finished " in listed
    table = [line.split() for line in shown["show"].ok().stdout.splitlines()]
    header = next(line for line in table if line[:2] == ["round", "seconds"])
    assert {"client_mean_accuracy", "consensus_distance", "spectral_gap", "central_accuracy"} <= set(header)
    rows = [dict(zip(header, line, strict=True)) for line in table if line and line[0].isdigit()]
    assert [(row["round"], row["num_selected"], row["num_ok"]) for row in rows] == [("1", "4", "4"), ("2", "4", "4")]
    assert all(row["spectral_gap"] == "0.6667" for row in rows)  # the 4-ring's: 1 - 1/3
    assert shown["report"].ok().stdout.startswith("wrote gossip.html (")
    page = (cli.cwd / "gossip.html").read_text()
    assert f"<h1>Run {run_id}</h1>" in page
    assert "<td>strategy</td><td>Gossip</td>" in page


@pytest.mark.parametrize("case", ERRORS)
def test_bad_gossip_input_ends_with_one_error_line(case: str, gossip_runs: dict[str, CliResult]) -> None:
    message = gossip_runs[case].error()
    for words in ERRORS[case][1]:
        assert words in message
