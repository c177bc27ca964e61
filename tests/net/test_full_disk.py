"""A server whose run directory has no room, on a real small file system: one line that says "no space left on
device" and names the path (never SQL), before it admits any site where the room is short at start.

The file system is a tmpfs of a few MiB, mounted in a user and mount namespace of a process of its own
(``unshare --user --map-root-user --mount``: no privileges needed where user namespaces are allowed; the tests
are skipped where they are not). The fedloom processes run in that namespace (``nsenter``) and see the tmpfs
where it is mounted; this process reaches it through the holder's ``/proc/PID/root``. The processes run as in
``test_deployment.py``.
"""

from __future__ import annotations

import errno
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from test_deployment import Done, Processes, free_port

from fedloom.data.base import ArrayData, ClientData
from fedloom.data.clientfile import save_client_data
from fedloom.tracking.tokens import TokenStore

# Servers and clients run as fedloom processes talking gRPC on loopback, on a tmpfs of their own.
pytestmark = pytest.mark.integration

JOB = ("digits", "--seed", "5", "--min-clients", "1", "--join-timeout", "60", "--round-timeout", "60")
SITES = ("client-000",)


class Tmpfs:
    """A tmpfs of ``size`` (as mount takes it: ``4m``) over the empty folder ``where`` (:attr:`where`), seen by a
    holder process and the commands run under :attr:`enter`, and from here at :attr:`path` (through the
    holder's ``/proc/PID/root``: a path for this process's own file calls; SQLite resolves that link, and so
    must not be given it). :meth:`read_only` remounts it read-only. Skips the test where no user namespace can
    be made."""

    def __init__(self, where: Path, size: str) -> None:
        if shutil.which("unshare") is None or shutil.which("nsenter") is None:
            pytest.skip("no unshare(1) or nsenter(1) to mount a tmpfs of our own")
        where.mkdir()
        self._trigger = where.with_name(where.name + ".read-only")
        script = (
            'mount -t tmpfs -o size="$1" fedloom-test "$0" && echo mounted || exit 1\n'
            'while [ ! -e "$2" ]; do sleep 0.05; done\n'
            'mount -o remount,ro "$0" && echo read-only\n'
            "exec sleep 600\n"
        )
        self._holder = subprocess.Popen(
            [
                "unshare",
                "--user",
                "--map-root-user",
                "--mount",
                "sh",
                "-c",
                script,
                str(where),
                size,
                str(self._trigger),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self._holder.stdout is not None
        if self._holder.stdout.readline().strip() != b"mounted":
            self.close()
            pytest.skip("a tmpfs cannot be mounted in a user namespace here")
        self.where = where
        self.path = Path(f"/proc/{self._holder.pid}/root{where}")
        self.enter = ("nsenter", "-t", str(self._holder.pid), "--user", "--mount", "--preserve-credentials")

    def fill(self) -> None:
        """Write a file until the file system is full."""
        full: OSError | None = None
        with open(self.path / "filler", "wb", buffering=0) as filler:
            block = bytes(1 << 16)
            while True:
                try:
                    filler.write(block)
                except OSError as exc:
                    full = exc
                    break
        assert full.errno == errno.ENOSPC, full
        with open(self.path / "filler", "ab", buffering=0) as filler:  # and the last few bytes
            for size in (4096, 512, 1):
                while True:
                    try:
                        filler.write(bytes(size))
                    except OSError:
                        break

    def free(self) -> None:
        (self.path / "filler").unlink()

    def read_only(self) -> None:
        self._trigger.touch()
        assert self._holder.stdout is not None
        assert self._holder.stdout.readline().strip() == b"read-only"

    def close(self) -> None:
        if self._holder.poll() is None:
            self._holder.kill()
        self._holder.wait(timeout=10)
        assert self._holder.stdout is not None
        self._holder.stdout.close()


def _seed(procs: Processes, disk: Tmpfs) -> dict[str, str]:
    """The sites' data (a few rows each, made here) and their tokens, made here in a run directory that is then
    copied onto the tmpfs (SQLite, given the ``/proc`` path, would resolve it to this namespace's folder)."""
    rng = np.random.default_rng(5)
    for site in SITES:
        rows = ArrayData(rng.random((24, 64), dtype=np.float32), rng.integers(0, 10, 24))
        save_client_data(procs.cwd / f"{site}.npz", ClientData(rows, rows))
    seed = procs.cwd / f"tokens-{disk.where.name}"
    store = TokenStore(seed)
    try:
        tokens = {site: store.create(site) for site in SITES}
    finally:
        store.close()
    shutil.copytree(seed, disk.path / "run")
    return tokens


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


@dataclass(frozen=True)
class Filled:
    """A run whose disk filled after its first round: the server's output, and how to run it again."""

    procs: Processes
    disk: Tmpfs
    server: Done
    command: tuple[str | Path, ...]
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Filled]:
    """A site trains on a server whose run directory is on a tmpfs of 8 MiB; once round 1 is recorded, the
    tmpfs is filled to the last byte, and the server ends."""
    folder = tmp_path_factory.mktemp("full")
    procs = Processes(folder)
    disk = Tmpfs(folder / "disk", "8m")
    try:
        tokens = _seed(procs, disk)
        address = f"127.0.0.1:{free_port()}"
        command = ("server", *JOB, "--address", address, "--rounds", "30", "--run-dir", disk.where / "run")
        command = (*command, "--insecure")
        server = procs.start(*command, prefix=disk.enter)
        clients = [_client(procs, address, site, tokens[site]) for site in SITES]
        _wait_for(disk.path / "run" / "checkpoints" / "round_00001.safetensors", 60)
        disk.fill()
        done = procs.wait(server, timeout=60)
        for client in clients:  # they would wait for the server to come back
            procs.kill(client)
        yield Filled(procs, disk, done, command, tokens)
    finally:
        procs.close()
        disk.close()


def _client(procs: Processes, address: str, site: str, token: str) -> int:
    return procs.start(
        *("client", "digits", "--server", address, "--data", f"{site}.npz", "--token", token),
        *("--insecure", "--retry-for", "60"),
    )


def test_a_full_disk_ends_the_server_with_one_line_naming_the_path_and_no_sql(filled: Filled):
    server = filled.server
    assert server.returncode == 2, server
    last = server.stderr.strip().splitlines()[-1]
    space = rf"no space left on device at {re.escape(str(filled.disk.where / 'run'))}\S*"
    assert re.fullmatch(rf"error: cannot (record|write the checkpoint of) round \d+ of run \S+: {space}", last), server
    for words in ("SQL", "INSERT", "parameters", "could not record its failure", "Traceback"):
        assert words not in server.stderr, server


def test_restarted_on_the_full_disk_it_fails_before_admitting_sites_and_resumes_once_space_is_freed(
    filled: Filled,
):
    procs, disk, command = filled.procs, filled.disk, filled.command
    address = str(command[command.index("--address") + 1])
    started = time.monotonic()
    again = procs.run(*command, timeout=60, prefix=disk.enter)
    run = re.escape(str(disk.where / "run"))
    assert re.fullmatch(
        rf"too little space left on device for the run directory {run}: 0 MiB \(0 bytes\) free, and a round "
        r"needs about [\d.]+ MiB \([\d,]+ bytes\) \(a checkpoint of the model and 4 MiB for the database\); free "
        r"space there, or give another --run-dir",
        again.error(),
    ), again
    assert "listening on" not in again.stdout, again
    assert time.monotonic() - started < 30  # it did not wait for the sites

    disk.free()
    server = procs.start(*command, prefix=disk.enter)
    clients = [_client(procs, address, site, filled.tokens[site]) for site in SITES]
    resumed = procs.wait(server, timeout=90).ok()
    assert re.search(r"resuming run \S+ after round \d+ of 30", resumed.stdout), resumed
    assert resumed.sha256()
    for client in clients:
        assert "the server said bye" in procs.wait(client, timeout=60).ok().stdout


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    runner = Processes(tmp_path)
    yield runner
    runner.close()


def test_a_run_directory_short_of_space_or_read_only_fails_before_any_site_is_admitted(
    procs: Processes, tmp_path: Path
):
    short, frozen = Tmpfs(tmp_path / "short", "2m"), Tmpfs(tmp_path / "frozen", "8m")
    try:
        servers = {}
        for name, disk in (("short", short), ("frozen", frozen)):
            _seed(procs, disk)
            if disk is frozen:
                disk.read_only()
            address = f"127.0.0.1:{free_port()}"
            servers[name] = procs.start(
                *("server", *JOB, "--address", address, "--rounds", "1", "--run-dir", disk.where / "run"),
                "--insecure",
                prefix=disk.enter,
            )
        done = {name: procs.wait(handle, timeout=60) for name, handle in servers.items()}
        for result in done.values():
            assert "listening on" not in result.stdout, result
        run = re.escape(str(short.where / "run"))
        assert re.fullmatch(
            rf"too little space left on device for the run directory {run}: [\d.]+ MiB \([\d,]+ bytes\) free, and "
            r"a round needs about [\d.]+ MiB \([\d,]+ bytes\) \(a checkpoint of the model and 4 MiB for the "
            r"database\); free space there, or give another --run-dir",
            done["short"].error(),
        ), done["short"]
        run = re.escape(str(frozen.where / "run"))
        assert re.fullmatch(
            rf"the server cannot use its run directory: {run} is not writable \(Read-only file system\)",
            done["frozen"].error(),
        ), done["frozen"]
    finally:
        short.close()
        frozen.close()
