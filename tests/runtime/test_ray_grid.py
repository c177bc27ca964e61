"""The Ray backend against a local 2-CPU Ray cluster that the test starts with the ``ray`` CLI, and against a
Ray that ``RayGrid`` starts itself: the same results as the inline backend, and clean failures."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from pools import JOB_FILE, TASK, FailingTask, bytes_up_agree, client_rows, digits_federation, fedavg

from fedloom.app.job import load_job
from fedloom.core import ConfigError, FitConfig, JobError, Message
from fedloom.core.results import fit_message
from fedloom.data.base import FederatedData
from fedloom.runtime import ClientStatus, InlineGrid, LoopResult
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.runtime.sim.dropout import DropoutGrid
from fedloom.runtime.sim.raygrid import RayGrid

ray = pytest.importorskip("ray")

# Ray clusters on this machine: the tests of one (xdist) group, so that two never start at once on two cores.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("ray"), pytest.mark.timeout(180)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A 2-CPU Ray head started with ``ray start --block``, its own temp folder (so that no other ``ray.init``
    on this machine finds it), stopped by stopping that command; yields its address."""
    cli = Path(sys.executable).parent / "ray"
    if not cli.exists():
        pytest.skip("the ray command is not installed next to this Python")
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="fedloom-ray-")  # short: Ray's socket paths must fit in 107 bytes
    log = Path(temp_dir, "ray-start.log")
    command = [str(cli), "start", "--head", "--block", "--num-cpus", "2", "--port", str(port)]
    command += ["--include-dashboard", "false", "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir]
    command += ["--ray-client-server-port", str(free_port())]  # not the fixed default, which another Ray may hold
    with log.open("w") as out:
        head = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while not Path(temp_dir, "ray_current_cluster").exists():  # written once the head is up
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            started = psutil.Process(head.pid).children(recursive=True)
        head.terminate()  # --block stops the head's processes on SIGTERM
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=10)
        for process in started:  # whatever outlived the head
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def data() -> FederatedData:
    return digits_federation()


def assert_same_run(got: LoopResult, want: LoopResult) -> None:
    assert got.params.sha256() == want.params.sha256()
    assert client_rows(got) == client_rows(want)
    assert bytes_up_agree(got, want)
    assert ClientStatus.DROPPED in [c.status for r in got.history for c in r.clients]
    assert all(c.seconds > 0 for r in got.history for c in r.clients if c.status == ClientStatus.OK)


def listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return False
    return True


def test_a_job_file_task_on_a_ray_cluster_gives_the_inline_results(
    cluster: str, tmp_path: Path, data: FederatedData, one_torch_thread: None
) -> None:
    path = tmp_path / "job.py"
    path.write_text(JOB_FILE)
    job = load_job(str(path))  # its module is not importable on the cluster: it travels by value
    with DropoutGrid(
        RayGrid(SimulatedClients.of(job.task, data, job_file=job.source), workers=2, address=cluster), 0.2, seed=7
    ) as grid:
        assert grid.inner.workers == 2
        on_ray = fedavg(job.task, grid)
    assert_same_run(on_ray, fedavg(job.task, DropoutGrid(InlineGrid(SimulatedClients.of(job.task, data)), 0.2, seed=7)))
    assert not ray.is_initialized()  # disconnected...
    assert listening(cluster)  # ...and the cluster keeps running


def test_a_task_that_raises_on_ray_is_a_job_error_naming_the_client(cluster: str, data: FederatedData) -> None:
    victim = data.client_ids[3]
    params = TASK.init_params(0)
    messages: dict[str, Message] = {
        cid: fit_message(1, params, FitConfig(batch_size=8, seed=i)) for i, cid in enumerate(data.client_ids)
    }
    grid = RayGrid(
        SimulatedClients.of(FailingTask(float(data.clients[victim].train.x.sum())), data), workers=2, address=cluster
    )
    with pytest.raises(JobError, match=rf"^client {victim} in fit raised RuntimeError: disk full$") as raised:
        grid.send_and_receive(messages)
    assert "disk full" in str(raised.value.__cause__)  # the actor's traceback comes along
    assert not ray.is_initialized()  # the failed grid closed itself
    with pytest.raises(Exception, match="closed"):
        grid.send_and_receive(messages)


def test_a_ray_that_the_grid_starts_itself_gives_the_inline_results(
    data: FederatedData, one_torch_thread: None
) -> None:
    with DropoutGrid(RayGrid(SimulatedClients.of(TASK, data), workers=2), 0.2, seed=7) as grid:
        assert ray.cluster_resources()["CPU"] == 2
        on_ray = fedavg(TASK, grid)
    assert_same_run(on_ray, fedavg(TASK, DropoutGrid(InlineGrid(SimulatedClients.of(TASK, data)), 0.2, seed=7)))
    assert not ray.is_initialized()  # the grid's own Ray is stopped


def test_an_address_where_nothing_listens_is_a_config_error_at_once(data: FederatedData) -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ConfigError, match=rf"cannot connect to the Ray cluster at 127.0.0.1:{port}: .*refused"):
        RayGrid(SimulatedClients.of(TASK, data), address=f"127.0.0.1:{port}")
    assert time.monotonic() - started < 10
    assert not ray.is_initialized()


def test_without_ray_the_backend_names_the_extra(monkeypatch: pytest.MonkeyPatch, data: FederatedData) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees when ray is not installed
    with pytest.raises(ConfigError, match=r"pip install 'fedloom\[ray\]'"):
        RayGrid(SimulatedClients.of(TASK, data))


def test_importing_fedloom_does_not_import_ray() -> None:
    code = "import sys, fedloom, fedloom.runtime.sim.raygrid; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
