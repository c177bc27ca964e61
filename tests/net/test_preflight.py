"""A deployment's server checks its run directory's room before it listens (:mod:`fedloom.app.preflight`)."""

from __future__ import annotations

import re
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from fedloom.app.preflight import DATABASE_MARGIN, check_room, checkpoint_bytes
from fedloom.core.errors import NoSpaceError
from fedloom.core.params import Params

MODEL = Params({"w": np.zeros((100, 10), np.float32), "b": np.zeros(10, np.float32)})


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
