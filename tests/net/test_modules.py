"""What a site runs imports none of the server: the client agent and TLS share only the gRPC options with it."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

SERVER_SIDE = ("fedloom.runtime.net.server", "fedloom.runtime.net.hub", "fedloom.runtime.net.grid")


def test_the_client_agent_imports_no_server_module():
    code = (
        "import sys, fedloom.runtime.net.client, fedloom.runtime.net.tls\n"
        f"print(sorted(set(sys.modules) & set({SERVER_SIDE!r})))"
    )
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
