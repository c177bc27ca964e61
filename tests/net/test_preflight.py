"""A deployment's server checks its model against ``--max-message-mb`` before it listens, and its run directory's
room before it admits a site (:mod:`fedloom.app.preflight`)."""

from __future__ import annotations

import re
import shutil
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_deployment import Processes, free_port

from fedloom.app.preflight import DATABASE_MARGIN, check_model_size, check_room, checkpoint_bytes
from fedloom.core.codec import encoded_size
from fedloom.core.errors import ConfigError, NoSpaceError
from fedloom.core.message import Message, MessageKind
from fedloom.core.params import Params

MODEL = Params({"w": np.zeros((100, 10), np.float32), "b": np.zeros(10, np.float32)})


def test_a_model_over_the_message_limit_is_refused_with_both_sizes():
    size = encoded_size(Message(MessageKind.FIT_RESULT, MODEL))
    check_model_size(MODEL, size)  # a reply exactly at the limit is granted
    with pytest.raises(ConfigError) as raised:
        check_model_size(MODEL, size - 1)
    assert str(raised.value) == (
        f"the model is {size / 2**20:.3g} MiB ({size:,} bytes) encoded, over --max-message-mb "
        f"{round((size - 1) / 2**20, 4):g} ({size - 1:,} bytes): every site's update would be declined; raise "
        f"--max-message-mb above {size / 2**20:.3g}"
    )


def test_a_run_directory_needs_room_for_a_checkpoint_and_the_database(tmp_path: Path, monkeypatch):
    needed = checkpoint_bytes(MODEL) + DATABASE_MARGIN
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * needed, 9 * needed, needed))
    check_room(tmp_path, MODEL)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * needed, 9 * needed, needed - 1))
    short = rf"^too little space left on device for the run directory {re.escape(str(tmp_path))}: "
    with pytest.raises(NoSpaceError, match=short):
        check_room(tmp_path, MODEL)
    assert list(tmp_path.iterdir()) == []  # the file that tried it is gone


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    runner = Processes(tmp_path)
    yield runner
    runner.close()


@pytest.mark.integration
def test_fedloom_server_refuses_a_model_over_max_message_mb_before_it_listens(procs: Processes):
    procs.run("token", "create", "site", "--run-dir", "run").ok()
    address = f"127.0.0.1:{free_port()}"
    done = procs.run(
        *("server", "digits", "--address", address, "--rounds", "1", "--min-clients", "1", "--run-dir", "run"),
        *("--insecure", "--max-message-mb", "0.005", "--join-timeout", "60"),
        timeout=60,
    )
    assert re.fullmatch(
        r"the model is 0\.\d+ MiB \([\d,]+ bytes\) encoded, over --max-message-mb 0\.005 \(5,242 bytes\): every "
        r"site's update would be declined; raise --max-message-mb above 0\.\d+",
        done.error(),
    ), done
    assert "listening" not in done.stdout + done.stderr
