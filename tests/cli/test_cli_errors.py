"""Bad input to ``fedloom simulate`` ends with exit code 2 and one ``error: ...`` line, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Cli, CliResult

# Every test here runs the fedloom console script in a subprocess (tests/cli/conftest.py).
pytestmark = pytest.mark.integration

JOB_FILES = {
    "raises.py": '''\
"""A job file that fails while it is imported (on line 3)."""

raise ValueError("boom")
''',
    "no_job.py": '''\
"""A job file that forgot to define `job`."""

import fedloom as fl

task = fl.LogisticRegressionTask(num_features=2, num_classes=2)
''',
    "broken_data.py": '''\
"""A job file whose data function raises."""

import fedloom as fl


def broken_data():
    raise RuntimeError("the data is not there")


job = fl.Job(name="broken_data", task=fl.LogisticRegressionTask(num_features=2, num_classes=2), data=broken_data)
''',
    "broken_model.py": '''\
"""A job file whose model factory raises."""

import fedloom as fl
from fedloom.data import load_digits


def model():
    raise RuntimeError("no such layer")


job = fl.Job(name="broken_model", task=fl.TorchTask(model=model), data=load_digits)
''',
    "bad_labels.py": '''\
"""A job file whose dataset has float labels."""

import numpy as np

import fedloom as fl
from fedloom.data import ArrayData, Dataset


def float_labels():
    x = np.zeros((20, 3), np.float32)
    return Dataset("floaty", ArrayData(x, np.linspace(0, 1, 20)), ArrayData(x, np.zeros(20)), num_classes=2)


job = fl.Job(name="bad_labels", task=fl.LogisticRegressionTask(num_features=3, num_classes=2), data=float_labels)
''',
    "wrong_strategy.py": """\
import fedloom as fl
from fedloom.data import load_digits

job = fl.Job(task=fl.LogisticRegressionTask(num_features=64, num_classes=10), data=load_digits, strategy="fedavg")
""",
}

SMALL = ("--clients", "5", "--rounds", "1")

# id -> (arguments after ``fedloom simulate``, words the error message must contain)
CASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "unknown_example": (
        ("nosuch",),
        ("unknown example 'nosuch'", "path/to/job.py", "digits", "heart_disease", "mnist", "mnist_2nn", "synthetic"),
    ),
    "missing_job_file": (("jobs/missing.py",), ("job file jobs/missing.py does not exist",)),
    "alpha_zero_dirichlet": (("synthetic", "--partition", "dirichlet", "--alpha", "0"), ("alpha must be > 0", "0.0")),
    "alpha_negative": (("digits", "--alpha", "-1", *SMALL), ("alpha must be > 0", "-1.0")),
    "more_clients_than_samples": (("digits", "--clients", "5000", "--rounds", "1"), ("1437", "5000 clients")),
    "missing_data_folder": (
        ("heart_disease", "--data", "no_such_folder", "--rounds", "1"),
        ("data folder no_such_folder does not exist",),
    ),
    "data_for_job_without_data_dir": (
        ("digits", "--data", "jobs", *SMALL),
        ("job 'digits' does not read a data folder", "--data jobs"),
    ),
    "job_file_raises": (("jobs/raises.py",), ("job file jobs/raises.py", "ValueError", "boom")),
    "job_file_raises_absolute": (("{cwd}/jobs/raises.py",), ("/jobs/raises.py", "ValueError", "boom")),
    "job_file_without_job": (("jobs/no_job.py",), ("jobs/no_job.py", "must define `job = fedloom.Job(...)`")),
    "job_data_raises": (
        ("jobs/broken_data.py", "--rounds", "1"),
        ("loading the data of job 'broken_data'", "RuntimeError", "the data is not there"),
    ),
    "model_factory_raises": (
        ("jobs/broken_model.py", *SMALL),
        ("the model of job 'broken_model'", "RuntimeError", "no such layer"),
    ),
    "float_labels": (("jobs/bad_labels.py", *SMALL), ("floaty: train labels must be integer class ids",)),
    "strategy_not_a_strategy": (("jobs/wrong_strategy.py",), ("Job.strategy must be a strategy", "'fedavg'")),
    "unknown_strategy": (("digits", "--strategy", "fedfoo", *SMALL), ("unknown strategy 'fedfoo'", "fedadam")),
    "unknown_strategy_arg": (
        ("digits", "--strategy", "fedadam", "--strategy-arg", "mu=1", *SMALL),
        ("strategy 'fedadam' has no argument 'mu'", "eta"),
    ),
    "strategy_arg_without_strategy": (("digits", "--strategy-arg", "mu=1", *SMALL), ("--strategy-arg needs",)),
    "bad_strategy_value": (
        ("digits", "--strategy", "trimmed_mean", "--strategy-arg", "beta=0.7", *SMALL),
        ("beta", "0.7"),
    ),
    "two_speed_models": (
        ("digits", "--speed-sigma", "0.5", "--speed-spread", "10", *SMALL),
        ("speed_sigma and speed_spread are two ways to draw client speeds",),
    ),
    "fedbuff_with_a_fraction": (
        ("digits", "--strategy", "fedbuff", "--fraction", "0.5", *SMALL),
        ("FedBuff keeps `concurrency` clients training", "do not apply"),
    ),
    "dp_flag_without_noise": (("digits", "--dp-clip", "0.2", *SMALL), ("--dp-clip needs --dp-noise Z",)),
    "secagg_and_paillier": (("digits", "--secagg", "--paillier", *SMALL), ("choose one",)),
    "secagg_around_fedbuff": (
        ("digits", "--strategy", "fedbuff", "--secagg", *SMALL),
        ("SecAgg cannot wrap FedBuff", "asynchronous"),
    ),
    "dp_around_fedbuff": (
        ("digits", "--strategy", "fedbuff", "--dp-noise", "1", *SMALL),
        ("DPFedAvg cannot wrap FedBuff", "asynchronous"),
    ),
    "too_few_replies": (
        ("digits", "--clients", "10", "--rounds", "2", "--dropout", "0.95", "--min-clients", "5", "--local-steps", "1"),
        ("round 1:", "clients replied", "fewer than min_clients=5"),
    ),
}


@pytest.fixture(scope="module")
def results(cli: Cli) -> dict[str, CliResult]:
    """Every case of :data:`CASES` (each with its own runs folder), run together."""
    jobs = cli.cwd / "jobs"
    jobs.mkdir()
    for name, text in JOB_FILES.items():
        (jobs / name).write_text(text)
    commands = {
        case: ["simulate", *(a.format(cwd=cli.cwd) for a in args), "--out", f"runs_{case}"]
        for case, (args, _) in CASES.items()
    }
    return cli.run_all(commands)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_ends_with_one_error_line(case: str, results: dict[str, CliResult]) -> None:
    message = results[case].error()
    for words in CASES[case][1]:
        assert words in message


@pytest.mark.parametrize(
    "case",
    [
        "job_file_raises",
        "job_file_raises_absolute",
    ],
)
def test_job_file_error_names_the_line(case: str, results: dict[str, CliResult]) -> None:
    assert "(line 3)" in results[case].error()


# id -> (arguments, words the error line must contain): mistakes typer finds before any fedloom code runs
USAGE_ERRORS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "bad_value": (
        ("simulate", "digits", "--rounds", "ten"),
        ("Invalid value for '--rounds'", "fedloom simulate --help"),
    ),
    "unknown_option": (("simulate", "digits", "--nope"), ("No such option: --nope", "fedloom simulate --help")),
    "missing_option": (("server", "digits", "--rounds", "1"), ("Missing option '--address'", "fedloom server --help")),
    "missing_argument": (("runs", "show"), ("Missing argument 'run'", "fedloom runs show --help")),
    "unknown_command": (("runs", "shw"), ("No such command 'shw'", "fedloom runs --help")),
}


@pytest.fixture(scope="module")
def usage(cli: Cli) -> dict[str, CliResult]:
    """Every case of :data:`USAGE_ERRORS`, and ``simulate --help``, run together."""
    commands = {case: list(args) for case, (args, _) in USAGE_ERRORS.items()}
    commands["help"] = ["simulate", "--help"]
    return cli.run_all(commands)


@pytest.mark.parametrize("case", USAGE_ERRORS)
def test_a_usage_error_is_one_error_line_as_every_other_mistake(case: str, usage: dict[str, CliResult]) -> None:
    result = usage[case]
    message = result.error()  # exit code 2, one line `error: ...`, no traceback
    for words in USAGE_ERRORS[case][1]:
        assert words in message
    assert "╭" not in result.stderr  # not typer's boxed panel
    assert result.stdout == ""


def test_help_is_still_typers_help(usage: dict[str, CliResult]) -> None:
    result = usage["help"].ok()
    assert "Usage: fedloom simulate [OPTIONS]" in result.stdout
    assert "--rounds" in result.stdout
    assert result.stderr == ""


def test_failed_run_is_recorded_as_failed(cli: Cli, results: dict[str, CliResult]) -> None:
    listing = cli.run("runs", "list", "--runs", "runs_too_few_replies").ok()
    (run_dir,) = (cli.cwd / "runs_too_few_replies").iterdir()
    assert run_dir.name in listing.stdout
    assert " failed " in listing.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"].startswith("NotEnoughClientsError: round 1:")
    assert summary["rounds"] == []


def test_bad_config_leaves_no_run_behind(cli: Cli, results: dict[str, CliResult]) -> None:
    # Errors found before the first round (flags, job file, data) stop the command before a run is created.
    for case in ("alpha_zero_dirichlet", "job_file_raises", "job_data_raises", "more_clients_than_samples"):
        assert not (cli.cwd / f"runs_{case}").exists(), case


# ---------------------------------------------------------------------------------------------- MNIST offline


@pytest.fixture(scope="module")
def mnist_result(cli: Cli, shared_data: Path) -> CliResult:
    """``simulate mnist --data <shared>/mnist`` (no training images there) with an empty download cache."""
    cache = cli.cwd / "mnist_cache"
    cache.mkdir()
    return cli.run(
        "simulate", "mnist", "--data", shared_data / "mnist", "--clients", "5", "--rounds", "1", "--out", "runs_mnist",
        env={"FEDLOOM_CACHE": str(cache)},
    )  # fmt: skip


def test_mnist_without_training_images_fails_clearly_offline(cli: Cli, mnist_result: CliResult) -> None:
    # The loader falls back to downloading the missing file even though --data was given; the proxies in the
    # test environment refuse the connection, so the command must fail at once, name the file, and leave
    # nothing in the cache.
    assert mnist_result.returncode == 2, mnist_result
    assert "Traceback" not in mnist_result.stderr, mnist_result
    error = mnist_result.stderr[mnist_result.stderr.index("error: ") :]
    assert "train-images-idx3-ubyte.gz" in error
    assert [p.name for p in (cli.cwd / "mnist_cache").rglob("*") if p.is_file()] == []
    assert not (cli.cwd / "runs_mnist").exists()


def test_mnist_without_training_images_is_one_error_line(mnist_result: CliResult) -> None:
    assert "train-images-idx3-ubyte.gz" in mnist_result.error()
