"""Fixtures shared by the whole test suite, and how tests are sorted into tiers.

Marking a new test (markers are registered in pyproject.toml; ``--strict-markers`` refuses any other):

- ``integration``: the test starts a process (``subprocess``, the ``fedloom`` console script, worker pools, Ray,
  and ``fl.simulate``'s ``auto`` backend where it may pick worker processes), a server (gRPC, HTTP, the dashboard,
  PostgreSQL through the ``postgres`` or ``db_url`` fixtures) or a browser, itself or through a fixture; or it
  trains on real data to an accuracy (seconds of training: an acceptance check). Mark the module
  (``pytestmark = pytest.mark.integration``) when all its tests are such, else the test, or the parametrization
  (``pytest.param(..., marks=pytest.mark.integration)``, as ``db_url`` does for PostgreSQL). The developers' inner
  loop, ``python -m pytest -m "not slow and not integration"``, leaves them out; the default run keeps them.
- ``slow`` (minutes) and ``network`` (the internet): left out of the default run.
- ``xdist_group("name")``: under ``-n ... --dist loadgroup`` (the README's command) each test module runs on one
  worker, so its module fixtures run once; tests that must not run at the same time as tests of other modules
  (a local Ray: two at once overload two cores) name a group they share, and a group runs on one worker.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Ray 2.60 turns token authentication on wherever ``~/.ray/auth_token`` exists, but a driver that connects to a
# given address sends the token only with RAY_AUTH_MODE=token, and a driver that started (and shut down) a Ray
# of its own keeps that Ray's setting. The Ray clusters of the tests live on this machine for one test module,
# so the whole session runs them without authentication, and without usage statistics.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# The repository's checkout sits next to a read-only ``shared/`` folder with small real datasets.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (``<checkout>/../shared/data``); skips the test when it is not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is missing")
    return SHARED_DATA


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Torch gets one thread for the test. Worker processes and Ray actors train with one thread each, and
    torch's CPU kernels may sum in another order with more, so an inline reference that must match them bit for
    bit runs with one thread too."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist's ``--dist loadgroup``, a test that names no ``xdist_group`` is in its module's group, so
    that each module's tests (and its module-scoped fixtures: servers, simulations) stay on one worker. Runs before
    xdist reads the groups."""
    if not config.getoption("loadgroup", default=False):
        return
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


# ---------------------------------------------------------------------------------------------- PostgreSQL


def _postgres_bin() -> Path | None:
    """Where Debian's PostgreSQL server programs are (initdb, pg_ctl), if installed."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A PostgreSQL server of this test session, started from Debian's packages (``scripts/system-deps.sh``
    installs them) in a fresh cluster on 127.0.0.1 and a free port, and stopped at the end: the URL of its
    superuser, without a database. Skips where PostgreSQL is not installed, except under CI, where it fails."""
    binaries = _postgres_bin()
    if binaries is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed; scripts/system-deps.sh installs it (apt: postgresql)")
        pytest.skip("PostgreSQL is not installed (apt install postgresql)")
    pytest.importorskip("psycopg")
    as_postgres: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="fedloom-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root: the cluster belongs to Debian's postgres user
        user = pwd.getpwnam("postgres")
        os.chown(data, user.pw_uid, user.pw_gid)
        as_postgres = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def run(*args: str) -> None:
        subprocess.run([*as_postgres, *args], check=True, capture_output=True, timeout=120)

    run(str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
    run(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"), "-o", options, "-w", "start")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def db_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """Each run store backend in turn, for contract tests: ``None`` (a SQLite file per run) or the URL of a fresh
    PostgreSQL database on the session's server."""
    if request.param == "sqlite":
        yield None
        return
    from sqlalchemy import create_engine

    from fedloom.tracking.schema import release_engines

    server = request.getfixturevalue("postgres")
    name = f"fedloom_{uuid.uuid4().hex[:12]}"
    admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield f"{server}/{name}"
        # A connection still in use here belongs to a thread the test left running (the dashboard's warm-up, say):
        # it would be dropped with the database and collected unclosed at some later test.
        assert release_engines() == 0, "a thread of this test still holds a connection to the run database"
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        admin.dispose()
