"""A client's state across rounds: what a round saves counts once the server is past that round."""

from __future__ import annotations

import numpy as np

from fedloom.core import Params
from fedloom.runtime.state import DirectoryState


def value(x: float) -> Params:
    return Params({"w": np.array([x])})


def seen(state: DirectoryState, server_round: int, kind: str = "fit") -> float | None:
    loaded = state.at_round(server_round, kind).load("k")
    return None if loaded is None else float(loaded["w"][0])


def test_a_rounds_save_is_staged_until_a_later_round_comes(tmp_path):
    state = DirectoryState(tmp_path)
    state.at_round(1, "fit").save("k", value(1.0))
    assert state.load("k") is None  # not committed: the server may still run round 1 again
    assert seen(state, 1, "evaluate") == 1.0  # round 1's evaluation sees what its training saved
    assert seen(state, 2) == 1.0  # round 2: the server is past round 1, so it is committed
    assert state.load("k") == value(1.0)
    assert not (tmp_path / "staged").exists() or not any((tmp_path / "staged").iterdir())


def test_a_fit_of_a_round_again_starts_from_the_state_before_that_round(tmp_path):
    state = DirectoryState(tmp_path)
    state.at_round(1, "fit").save("k", value(1.0))
    state.at_round(2, "fit").save("k", value(2.0))
    assert seen(state, 2, "evaluate") == 2.0
    assert seen(state, 2) == 1.0  # round 2 again (the server resumed after round 1): its first try is gone
    assert seen(state, 2, "evaluate") == 1.0
    state.at_round(2, "fit").save("k", value(2.5))
    assert seen(state, 3) == 2.5


def test_rounds_a_client_sat_out_and_rounds_from_a_lost_future(tmp_path):
    state = DirectoryState(tmp_path)
    state.at_round(3, "fit").save("k", value(3.0))
    assert seen(state, 7) == 3.0  # not asked in rounds 4 to 6: round 3 still counts once round 7 comes
    state.at_round(9, "fit").save("k", value(9.0))
    # The server resumed from an earlier checkpoint (round 5): round 9's save is from a run that is gone.
    assert seen(state, 6) == 3.0
    assert seen(state, 10) == 3.0


def test_commit_at_the_end_of_a_run_keeps_the_last_rounds_state(tmp_path):
    state = DirectoryState(tmp_path)
    state.at_round(1, "fit").save("k", value(1.0))
    state.at_round(2, "fit").save("k", value(2.0))
    state.commit()
    assert state.load("k") == value(2.0)
    assert seen(state, 1) == 2.0  # a new run on the same folder starts from it
