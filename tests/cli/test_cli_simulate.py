"""``fedloom simulate`` through the real console script: output, run directory, flags, reproducibility."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fedloom.privacy import epsilon

if TYPE_CHECKING:
    from conftest import Cli, CliResult

# Every test here runs the fedloom console script in a subprocess (tests/cli/conftest.py); the modules that read
# the session's digits runs share an xdist group, so those runs are made once.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("digits_runs")]


def _summary(run_dir: Path) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    return summary


def _round_lines(result: CliResult) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("round ")]


@pytest.fixture(scope="module")
def heart_runs(cli: Cli, shared_data: Path) -> dict[str, CliResult]:
    """Two heart disease runs from the shared data folder, started together: at a wide and at 80 columns."""
    args = ("simulate", "heart_disease", "--data", shared_data / "heart_disease", "--rounds", "2")
    wide = cli.start(*args, "--out", "runs_heart")
    narrow = cli.start(*args, "--out", "runs_80", env={"COLUMNS": "80"})
    return {"wide": wide.result(), "80_columns": narrow.result()}


# ---------------------------------------------------------------------------------------------- happy path


def test_simulate_prints_a_line_per_round_and_the_params_hash(digits_run: CliResult) -> None:
    assert digits_run.stderr == ""
    header = digits_run.stdout.splitlines()[0]
    assert header == "fedloom: job digits, 5 clients, 2 rounds, partition dirichlet (alpha 0.5), seed 7"
    lines = _round_lines(digits_run)
    assert [line.split("  ")[0] for line in lines] == ["round 1/2", "round 2/2"]
    assert all("clients 5/5" in line and re.search(r"acc \d\.\d{4}", line) for line in lines), lines
    assert re.search(r"^finished run \S+: .*central_accuracy \d\.\d{4}", digits_run.stdout, re.MULTILINE)
    assert re.fullmatch(r"[0-9a-f]{64}", digits_run.params_sha256())


def test_simulate_writes_the_run_directory(cli: Cli, digits_run: CliResult) -> None:
    run_dir = digits_run.run_dir(cli.cwd)
    assert run_dir.parent == cli.cwd / "runs"
    assert (run_dir / "run.db").is_file()
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    # every round's global params; the strategy's state (here FedAvg's round counter) after the last round only
    assert checkpoints == ["round_00001.safetensors", "round_00002.safetensors", "round_00002.state.safetensors"]
    summary = _summary(run_dir)
    assert {"run_id", "config", "rounds", "final", "params_sha256"} <= summary.keys()
    assert summary["run_id"] == run_dir.name
    assert summary["status"] == "finished"
    assert summary["params_sha256"] == digits_run.params_sha256()
    assert summary["config"]["simulation"]["num_clients"] == 5
    assert summary["config"]["simulation"]["seed"] == 7
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["final"]["central_accuracy"] == summary["rounds"][-1]["metrics"]["central_accuracy"]


def test_simulate_heart_disease_from_a_data_folder(
    cli: Cli, shared_data: Path, heart_runs: dict[str, CliResult]
) -> None:
    result = heart_runs["wide"].ok()
    assert all("clients 4/4" in line for line in _round_lines(result))
    assert len(_round_lines(result)) == 2
    summary = _summary(result.run_dir(cli.cwd))
    assert summary["config"]["simulation"]["data_dir"] == str(shared_data / "heart_disease")
    assert summary["config"]["simulation"]["partition"]["scheme"] == "natural"
    assert not (cli.cwd / "cache" / "heart_disease").exists()  # read from the folder, nothing fetched


def test_recorded_config_holds_only_settings(cli: Cli, digits_run: CliResult) -> None:
    task = _summary(digits_run.run_dir(cli.cwd))["config"]["task"]
    assert task["type"] == "TorchTask"
    assert not [name for name in task if name.startswith("_")], task


# ---------------------------------------------------------------------------------------------- reproducibility


def test_same_seed_gives_the_same_params(cli: Cli, digits_run: CliResult, digits_runs: dict[str, CliResult]) -> None:
    again = digits_runs["seed7_again"].ok()
    assert again.params_sha256() == digits_run.params_sha256()
    first, second = (_summary(r.run_dir(cli.cwd)) for r in (digits_run, again))
    assert first["run_id"] != second["run_id"]
    assert [r["metrics"] for r in first["rounds"]] == [r["metrics"] for r in second["rounds"]]


def test_another_seed_gives_other_params(digits_run: CliResult, digits_runs: dict[str, CliResult]) -> None:
    assert digits_runs["seed8_quiet"].ok().params_sha256() != digits_run.params_sha256()


@pytest.mark.parametrize(
    ("run", "partition"),
    [("flags", "partition iid,"), ("dropout", "partition shards (3 per client),")],
)
def test_the_header_names_the_partition_with_its_parameters(
    digits_runs: dict[str, CliResult], run: str, partition: str
) -> None:
    header = digits_runs[run].ok().stdout.splitlines()[0]
    assert header.startswith("fedloom: job digits, ")
    assert f" {partition} " in header


def test_quiet_prints_only_the_summary(digits_runs: dict[str, CliResult]) -> None:
    quiet = digits_runs["seed8_quiet"].ok()
    assert _round_lines(quiet) == []
    assert "finished run" in quiet.stdout


# ---------------------------------------------------------------------------------------------- flags


def test_flags_override_the_job_defaults(cli: Cli, digits_runs: dict[str, CliResult]) -> None:
    result = digits_runs["flags"].ok()
    lines = _round_lines(result)
    assert len(lines) == 2
    assert all("clients 2/2" in line for line in lines), lines  # C = 0.4 of 5 clients
    summary = _summary(result.run_dir(cli.cwd))
    simulation, strategy = summary["config"]["simulation"], summary["config"]["strategy"]
    assert simulation["num_clients"] == 5
    assert simulation["seed"] == 1
    assert simulation["partition"]["scheme"] == "iid"
    assert simulation["partition"]["alpha"] == pytest.approx(0.3)
    assert strategy["fraction"] == pytest.approx(0.4)
    assert strategy["min_clients"] == 2
    fit = strategy["fit"]
    assert (fit["local_epochs"], fit["local_steps"], fit["batch_size"]) == (None, 3, 8)
    assert fit["lr"] == pytest.approx(0.05)
    assert [(r["num_selected"], r["num_ok"]) for r in summary["rounds"]] == [(2, 2), (2, 2)]


def test_dropout_drops_some_clients(cli: Cli, digits_runs: dict[str, CliResult]) -> None:
    result = digits_runs["dropout"].ok()
    summary = _summary(result.run_dir(cli.cwd))
    simulation, fit = summary["config"]["simulation"], summary["config"]["strategy"]["fit"]
    assert simulation["dropout"] == pytest.approx(0.3)
    assert simulation["partition"]["scheme"] == "shards"
    assert simulation["partition"]["shards_per_client"] == 3
    assert (fit["local_epochs"], fit["local_steps"]) == (1, None)

    exported = cli.run("runs", "export", summary["run_id"], "--format", "json", "--runs", "runs_drop").ok()
    clients = json.loads(exported.stdout)["clients"]
    fit_records = [c for c in clients if c["phase"] == "fit"]
    assert len(fit_records) == 20  # 10 clients asked in each of 2 rounds
    dropped = [c for c in fit_records if c["status"] == "dropped"]
    assert dropped, clients
    assert {c["status"] for c in clients} == {"ok", "dropped"}
    # The round lines and the rounds table count the same replies as the client records.
    for line, record in zip(_round_lines(result), summary["rounds"], strict=True):
        num_dropped = sum(c["round"] == record["round"] for c in dropped)
        assert record["num_dropped"] == num_dropped
        assert f"clients {10 - num_dropped}/10" in line


# ---------------------------------------------------------------------------------------------- a user's job file


NUMPY_JOB = '''\
"""A NumPy-only job: FedProx's synthetic data over its 8 natural devices, logistic regression."""

from functools import partial

import fedloom as fl
from fedloom.data import load_synthetic

job = fl.Job(
    name="tiny_synthetic",
    task=fl.LogisticRegressionTask(num_features=20, num_classes=5),
    data=partial(load_synthetic, num_clients=8, dim=20, num_classes=5, seed=1),
    strategy=fl.FedAvg(fraction=0.5, fit=fl.FitConfig(local_epochs=1, batch_size=10, lr=0.05)),
    simulation=fl.SimulationConfig(num_clients=8, rounds=5, partition=fl.PartitionConfig(scheme="natural")),
)
'''

# Runs the CLI's entry point in this process, then reports whether anything imported torch.
RUN_MAIN_THEN_CHECK_TORCH = """\
import sys
sys.argv = ["fedloom", "simulate", "user_jobs/numpy_job.py", "--rounds", "2", "--out", "runs_numpy"]
from fedloom.cli.main import main
try:
    main()
    code = 0
except SystemExit as exc:
    code = exc.code
print("torch imported:", "torch" in sys.modules)
sys.exit(code)
"""


def test_numpy_job_file_runs_without_importing_torch(cli: Cli) -> None:
    folder = cli.cwd / "user_jobs"
    folder.mkdir()
    (folder / "numpy_job.py").write_text(NUMPY_JOB)
    result = cli.run_python(RUN_MAIN_THEN_CHECK_TORCH).ok()
    assert "torch imported: False" in result.stdout
    lines = _round_lines(result)
    assert [line.split("  ")[:2] for line in lines] == [["round 1/2", "clients 4/4"], ["round 2/2", "clients 4/4"]]
    summary = _summary(result.run_dir(cli.cwd))
    assert summary["name"] == "tiny_synthetic"
    assert summary["config"]["dataset"] == "synthetic"
    assert summary["config"]["task"]["type"] == "LogisticRegressionTask"
    assert summary["config"]["simulation"]["rounds"] == 2
    assert summary["params_sha256"] == result.params_sha256()


# ---------------------------------------------------------------------------------------------- width


def test_round_lines_are_not_wrapped_at_80_columns(cli: Cli, heart_runs: dict[str, CliResult]) -> None:
    result = heart_runs["80_columns"].ok()
    lines = _round_lines(result)
    assert len(lines) == 2
    assert all(re.search(r"acc \d\.\d{4}  \d+\.\d\ds$", line) for line in lines), result
    # The run directory can be a long path without spaces; it must stay on its line to be copied.
    assert result.run_dir(cli.cwd).is_dir()


def test_strategy_flags_build_the_named_algorithm_and_keep_the_jobs_settings(
    cli: Cli, digits_runs: dict[str, CliResult]
) -> None:
    run = digits_runs["fedadam"].ok()
    strategy = _summary(run.run_dir(cli.cwd))["config"]["strategy"]
    assert strategy["type"] == "FedAvg"
    assert strategy["server_optimizer"] == {"type": "Adam", "eta": 0.05, "beta1": 0.9, "beta2": 0.99, "tau": 0.01}
    assert strategy["fit"]["lr"] == 0.05  # a flag laid over the named strategy
    assert strategy["fit"]["local_epochs"] == 5  # the digits job's own setting, kept
    assert run.params_sha256() != digits_runs["happy"].ok().params_sha256()


def test_secagg_sums_securely_and_lands_within_the_quantization_error_of_plain_fedavg(
    cli: Cli, digits_runs: dict[str, CliResult]
) -> None:
    run_dir = digits_runs["secagg"].ok().run_dir(cli.cwd)
    summary = _summary(run_dir)
    assert summary["config"]["strategy"]["type"] == "SecAgg"
    assert summary["config"]["strategy"]["strategy"]["type"] == "FedAvg"
    plain = _summary(digits_runs["happy"].ok().run_dir(cli.cwd))
    secure, clear = summary["final"], plain["final"]
    assert secure["secagg_survivors"] == 5.0
    assert secure["central_loss"] == pytest.approx(clear["central_loss"], abs=1e-4)  # the same model, to ~1e-7
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert {e["protection"] for e in ledger} == {"secagg"}
    assert len(ledger) == 10  # 5 clients x 2 rounds


def test_paillier_decrypts_only_the_sum_and_lands_where_secagg_does(
    cli: Cli, digits_runs: dict[str, CliResult]
) -> None:
    run = digits_runs["paillier"].ok()
    summary = _summary(run.run_dir(cli.cwd))
    assert summary["config"]["strategy"]["type"] == "PaillierAgg"
    assert summary["final"]["he_clients"] == 5.0
    # Both quantize the same updates with the same range and cohort, and both sums are exact: the same model.
    assert run.params_sha256() == digits_runs["secagg"].ok().params_sha256()
    ledger = [json.loads(line) for line in (run.run_dir(cli.cwd) / "ledger.jsonl").read_text().splitlines()]
    assert {e["protection"] for e in ledger} == {"paillier"}


def test_dp_flags_run_dp_fedavg_and_stop_before_the_target_epsilon(cli: Cli, digits_runs: dict[str, CliResult]) -> None:
    result = digits_runs["dp"].ok()
    assert "the run ends before round 2: round 2 would bring epsilon to 3.955" in result.stderr
    summary = _summary(result.run_dir(cli.cwd))
    strategy = summary["config"]["strategy"]
    assert (strategy["type"], strategy["num_clients"], strategy["delta"]) == ("DPFedAvg", 5, 1e-5)
    assert [r["round"] for r in summary["rounds"]] == [1]
    expected = epsilon(noise_multiplier=1.5, sample_rate=0.8, rounds=1, delta=1e-5)
    assert summary["final"]["epsilon"] == pytest.approx(expected)
    assert summary["final"]["dp_clip"] == 0.2
    spent = cli.run("privacy", "spent", str(result.run_dir(cli.cwd))).ok()
    assert f"DP-FedAvg (user level): epsilon {expected:.4f} at delta 1e-05 after round 1" in spent.stdout


def test_fedbuff_runs_asynchronously_on_a_simulated_clock(cli: Cli, digits_runs: dict[str, CliResult]) -> None:
    run = digits_runs["fedbuff"].ok()
    summary = _summary(run.run_dir(cli.cwd))
    assert summary["config"]["strategy"]["type"] == "FedBuff"
    assert summary["config"]["simulation"]["system"]["speed_spread"] == 10
    final = summary["final"]
    assert final["sim_seconds"] > 0  # the clock the client speeds drive
    assert 0 <= final["staleness_mean"] <= final["staleness_max"]
    assert len(_round_lines(run)) == 2  # one line per server update
