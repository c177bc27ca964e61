"""The server's malloc setting: threads share two glibc arenas, so freed frames are not kept per thread."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# Each test measures malloc arenas in a Python process of its own.
pytestmark = pytest.mark.integration

_PROGRAM = """
import ctypes, sys, threading
from fedloom.runtime.net.server import share_malloc_arenas
shared = share_malloc_arenas() if sys.argv[1] == "share" else None

together = threading.Barrier(12)

def work():  # like the server's stream threads: alive at once, each handling 1 MiB frames
    for _ in range(20):
        frame = bytes(1 << 20)
        together.wait()
        del frame

threads = [threading.Thread(target=work) for _ in range(12)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(shared, flush=True)
ctypes.CDLL(None).malloc_stats()  # one "Arena N:" block per arena, on stderr
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc arenas")


def _run(mode: str, **env: str) -> tuple[str, int]:
    environment = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env
    done = subprocess.run(
        [sys.executable, "-c", _PROGRAM, mode], capture_output=True, text=True, env=environment, timeout=60, check=True
    )
    return done.stdout.strip(), done.stderr.count("Arena ")


@glibc_only
def test_threads_share_two_arenas_once_the_server_asks():
    _, alone = _run("alone")
    shared, arenas = _run("share")
    assert alone > 2  # each thread that allocated got an arena of its own
    assert shared == "True"
    assert arenas <= 2


@glibc_only
def test_an_operator_setting_is_left_alone():
    shared, arenas = _run("share", MALLOC_ARENA_MAX="3")
    assert shared == "False"
    assert arenas <= 3
