"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
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
