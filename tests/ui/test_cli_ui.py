"""``fedloom ui`` as a command: its address, its token, and its errors."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from dashboard_server import COMMAND, dashboard
from federation_runs import record_run

from fedloom.cli.ui import is_loopback

pytest.importorskip("fastapi")


@pytest.mark.integration
def test_serves_runs_and_requires_a_given_token(tmp_path: Path) -> None:
    record_run(tmp_path, "alpha", rounds=2, clients=3)
    with dashboard(tmp_path, "--token", "letmein") as address:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(address + "api/runs", timeout=10)
        assert refused.value.code == 401
        refused.value.close()
        request = urllib.request.Request(address + "api/runs", headers={"Authorization": "Bearer letmein"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert [run["name"] for run in json.load(answer)] == ["alpha"]


@pytest.mark.integration
def test_a_taken_port_is_one_error_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*COMMAND, "ui", "--runs", str(tmp_path), "--port", str(port)], capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: port {port} on 127.0.0.1 is in use; give another with --port (0 picks a free one)"
    ]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("localhost", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("10.0.0.5", False),
    ],
)
def test_which_addresses_need_a_token(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
