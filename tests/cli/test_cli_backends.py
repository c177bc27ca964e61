"""``fedloom simulate --backend ...`` and the cross-device flags, through the real console script."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import pytest

from fedloom.runtime import ClientStatus
from fedloom.tracking import RunStore

if TYPE_CHECKING:
    from conftest import Cli, CliResult

# Every test here runs the fedloom console script in a subprocess (tests/cli/conftest.py); one of them starts a
# local Ray, so the module is in the Ray tests' xdist group.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("ray")]

SMALL = ("simulate", "digits", "--clients", "12", "--rounds", "2", "--seed", "4", "--quiet")


def _backend_line(result: CliResult) -> str:
    lines = [line for line in result.stdout.splitlines() if line.startswith("backend ")]
    assert len(lines) == 1, result
    return lines[0]


@pytest.fixture(scope="module")
def backend_runs(cli: Cli) -> dict[str, CliResult]:
    """The same small digits job on every backend (Ray starts a local Ray of two workers), started together."""
    commands = {
        name: [*SMALL, "--backend", name, "--workers", "2", "--out", f"runs_backend_{name}"]
        for name in ("inline", "vectorized", "process", "ray")
    }
    commands["auto"] = [*SMALL, "--out", "runs_backend_auto"]
    commands["numpy_vectorized"] = [
        *("simulate", "synthetic", "--rounds", "1", "--quiet", "--backend", "vectorized", "--out", "runs_np")
    ]
    return cli.run_all(commands)


def test_process_and_ray_give_the_inline_result_bit_for_bit(backend_runs: dict[str, CliResult]) -> None:
    inline = backend_runs["inline"].ok().params_sha256()
    assert backend_runs["process"].ok().params_sha256() == inline
    assert backend_runs["ray"].ok().params_sha256() == inline


def test_each_run_says_which_backend_ran_it_and_why(backend_runs: dict[str, CliResult]) -> None:
    assert _backend_line(backend_runs["inline"].ok()) == "backend inline: as asked"
    assert _backend_line(backend_runs["ray"].ok()) == "backend ray: as asked"
    assert _backend_line(backend_runs["vectorized"].ok()) == "backend vectorized: as asked"
    assert (
        _backend_line(backend_runs["auto"].ok()) == "backend vectorized: the task's model trains in lockstep with vmap"
    )


def test_auto_is_the_vectorized_backend_for_the_digits_mlp(backend_runs: dict[str, CliResult]) -> None:
    assert backend_runs["auto"].ok().params_sha256() == backend_runs["vectorized"].ok().params_sha256()


def test_a_task_the_vectorized_backend_cannot_run_falls_back_with_one_line(backend_runs: dict[str, CliResult]) -> None:
    line = _backend_line(backend_runs["numpy_vectorized"].ok())
    assert line.startswith("backend inline: vectorized cannot run this task (it needs a TorchTask, this is a ")
    assert "LogisticRegressionTask" in line


def test_the_backend_is_recorded_in_the_runs_config(cli: Cli, backend_runs: dict[str, CliResult]) -> None:
    run_dir = backend_runs["process"].ok().run_dir(cli.cwd)
    config = RunStore(run_dir.parent).config(run_dir.name)
    assert config["backend"] == "process"
    assert config["simulation"]["backend"]["name"] == "process"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_bad_backend_settings_are_one_line_errors(cli: Cli) -> None:
    import torch

    commands = {
        "unknown": [*SMALL, "--backend", "gpu"],
        "no_ray_there": [*SMALL, "--ray-address", f"127.0.0.1:{_closed_port()}"],
        "workers": [*SMALL, "--backend", "process", "--workers", "0"],
    }
    if not torch.cuda.is_available():
        commands["no_gpu"] = [*SMALL, "--device", "cuda"]
    results = cli.run_all(commands)
    assert results["unknown"].error() == "unknown backend 'gpu'; choose one of auto, inline, vectorized, process, ray"
    assert "127.0.0.1" in results["no_ray_there"].error()
    assert results["workers"].error() == "workers must be >= 1, got 0"
    if "no_gpu" in results:
        assert results["no_gpu"].error() == "--device cuda was asked for, but torch sees no CUDA GPU on this machine"


def test_cross_device_flags_make_late_clients_that_the_run_records(cli: Cli) -> None:
    result = cli.run(
        *("simulate", "cross_device", "--clients", "5000", "--rounds", "2", "--clients-per-round", "50"),
        *("--availability", "0.5", "--speed-sigma", "1.0", "--deadline", "1.0", "--quiet", "--out", "runs_xdev"),
    ).ok()
    run_dir = result.run_dir(cli.cwd)
    store = RunStore(run_dir.parent)
    rows = store.client_metrics(run_dir.name)
    statuses = [row["status"] for row in rows]
    assert len(statuses) == 100  # 50 asked per round, two rounds
    assert 0 < statuses.count(ClientStatus.LATE) < 100
    assert statuses.count(ClientStatus.OK) + statuses.count(ClientStatus.LATE) == 100
    config = store.config(run_dir.name)
    assert config["simulation"]["system"]["deadline"] == 1.0
