"""What a deployment keeps in its run directory: hashed client tokens, a resumable run, the client timeline."""

import shutil
from datetime import datetime, timezone

import numpy as np
import pytest

from fedloom.core import ConfigError, Params, RunStoreError
from fedloom.runtime.records import ClientEvent, RoundRecord
from fedloom.tracking import RunRecorder, RunStore
from fedloom.tracking.tokens import TOKEN_PREFIX, TokenStore

CONFIG = {"job": "digits", "rounds": 5, "seed": 3}


def test_tokens_are_stored_hashed_name_their_client_and_can_be_revoked(tmp_path):
    store = TokenStore(tmp_path / "run")
    token = store.create("hospital-a")
    other = store.create("hospital-b")
    assert token.startswith(TOKEN_PREFIX)
    assert token != other
    assert token.encode() not in (tmp_path / "run" / "run.db").read_bytes()  # only its hash is kept
    assert store.authenticate(token) == "hospital-a"
    assert store.authenticate(token + "x") is None
    assert store.authenticate("not a token") is None
    with pytest.raises(ConfigError, match="has a valid token already; revoke it first"):
        store.create("hospital-a")
    with pytest.raises(ConfigError, match="must be 1 to 64 letters"):
        store.create("a b")
    store.revoke("hospital-a")
    assert store.authenticate(token) is None
    assert store.authenticate(other) == "hospital-b"
    with pytest.raises(ConfigError, match="has no valid token"):
        store.revoke("hospital-a")
    fresh = store.create("hospital-a")  # a revoked site can be given a new token
    assert TokenStore(tmp_path / "run").authenticate(fresh) == "hospital-a"  # seen from another handle
    listed = [(info.client_name, info.revoked_at is None) for info in store.list()]
    assert listed == [("hospital-a", False), ("hospital-b", True), ("hospital-a", True)]
    assert store.count_valid() == 2
    store.close()


def _round(n: int) -> tuple[RoundRecord, Params]:
    state = {"fit": {"bit_generator": "PCG64", "state": {"state": 2**100 + n, "inc": 7}}}
    return RoundRecord(n, {"fit_loss": 1.0 / n}, (), 0.1, state), Params({"w": np.full(3, float(n), np.float32)})


def test_a_run_directory_resumes_after_its_last_recorded_round(tmp_path, db_url):
    run_dir = tmp_path / "deployment"
    TokenStore(run_dir).create("site")  # tokens come first, in the same database
    recorder, resume = RunRecorder.open(run_dir, "digits", CONFIG, url=db_url)
    assert resume is None
    for n in (1, 2):
        recorder.on_round(*_round(n))
    recorder.close()  # the server dies: no finish

    again, resume = RunRecorder.open(run_dir, "digits", CONFIG, url=db_url)
    assert again.run_id == recorder.run_id
    assert resume is not None
    assert resume.completed_rounds == 2
    assert resume.params.sha256() == _round(2)[1].sha256()
    assert resume.random_state == _round(2)[0].random_state  # 128-bit integers survive JSON
    with pytest.raises(RunStoreError, match="round 2 arrived after round 2"):
        again.on_round(*_round(2))  # a round is never recorded twice
    again.on_round(*_round(3))
    again.finish(_round(3)[1])
    info = RunStore(tmp_path, db_url).info(str(run_dir))
    assert (info.status, info.rounds) == ("finished", 3)
    with pytest.raises(RunStoreError, match="has finished already"):
        RunRecorder.open(run_dir, "digits", CONFIG, url=db_url)


def test_resuming_with_other_settings_is_refused_naming_them(tmp_path, db_url):
    recorder, _ = RunRecorder.open(tmp_path / "run", "digits", CONFIG, url=db_url)
    recorder.close()
    with pytest.raises(ConfigError, match=r"other settings \(rounds: 5 there, 6 now\)"):
        RunRecorder.open(tmp_path / "run", "digits", {**CONFIG, "rounds": 6}, url=db_url)


def test_client_events_are_kept_in_order_across_calls(tmp_path, db_url):
    recorder, _ = RunRecorder.open(tmp_path / "run", "digits", CONFIG, url=db_url)
    at = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
    recorder.on_events([ClientEvent(at, "a", "connected", detail="ipv4:127.0.0.1:5000")])
    recorder.on_round(*_round(1))
    recorder.on_events([ClientEvent(at, "a", "training", 1, 1234), ClientEvent(at, "a", "dropped", 1, detail="gone")])
    recorder.close()
    events = RunStore(tmp_path, db_url).client_events(str(tmp_path / "run"))
    assert [(e["seq"], e["round"], e["event"], e["bytes"]) for e in events] == [
        (1, None, "connected", 0),
        (2, 1, "training", 1234),
        (3, 1, "dropped", 0),
    ]
    assert events[0]["at"] == at
    assert events[2]["detail"] == "gone"


def _deployment(run_dir, url) -> RunRecorder:
    """A finished one-round deployment recorded in ``run_dir``, as ``fedloom server --run-dir`` records it."""
    recorder, _ = RunRecorder.open(run_dir, "digits", CONFIG, url=url)
    recorder.on_round(*_round(1))
    recorder.finish(_round(1)[1])
    return recorder


def test_a_deployment_is_found_by_its_id_a_prefix_its_folder_or_its_path(tmp_path, db_url):
    root = tmp_path / "runs"
    simulated = RunRecorder.create(root, "sim", CONFIG, url=db_url)  # beside it, a run whose folder is its id
    simulated.finish(_round(1)[1])
    folder = root / "site-run"
    deployed = _deployment(folder, db_url)
    assert deployed.run_id != folder.name
    store = RunStore(root, db_url)
    assert {info.run_id: info.path for info in store.list_runs()} == {
        deployed.run_id: folder,
        simulated.run_id: simulated.run_dir,
    }
    prefix = deployed.run_id[: deployed.run_id.index("-digits-") + 2]  # past the timestamp both ids may share
    for ref in (deployed.run_id, prefix, "site-run", str(folder)):
        assert store.resolve(ref) == folder, ref
        assert store.info(ref).run_id == deployed.run_id, ref
        assert store.run_dir(ref) == folder, ref
        assert [row["round"] for row in store.rounds(ref)] == [1], ref
    assert store.resolve(simulated.run_id) == simulated.run_dir
    with pytest.raises(RunStoreError, match="no run matches 'site-runs'") as unknown:
        store.resolve("site-runs")
    assert f"{deployed.run_id} (site-run)" in str(unknown.value)  # listed by its id, with its folder


def test_a_deployment_elsewhere_is_found_by_its_path_and_in_a_shared_database_by_its_id(tmp_path, db_url):
    root = tmp_path / "runs"
    root.mkdir()
    elsewhere = tmp_path / "srv" / "federation"
    deployed = _deployment(elsewhere, db_url)
    store = RunStore(root, db_url)
    assert store.resolve(str(elsewhere)) == elsewhere
    assert store.run_dir(str(elsewhere)) == elsewhere
    assert store.info(str(elsewhere)).run_id == deployed.run_id
    if db_url is None:  # its rows are in its own folder, which the runs folder does not hold: not listed
        assert store.list_runs() == []
        with pytest.raises(RunStoreError, match="a run directory elsewhere can be given by its path"):
            store.resolve(deployed.run_id)
    else:  # the shared database lists it and holds its rows; its files are in its own folder
        assert [info.run_id for info in store.list_runs()] == [deployed.run_id]
        assert store.info(deployed.run_id).rounds == 1
        with pytest.raises(RunStoreError, match="its run directory is elsewhere"):
            store.run_dir(deployed.run_id)


def test_a_run_id_in_two_folders_is_ambiguous_and_each_folder_names_its_copy(tmp_path):
    root = tmp_path / "runs"
    deployed = _deployment(root / "site-run", None)
    shutil.copytree(root / "site-run", root / "site-run-copy")
    store = RunStore(root)
    with pytest.raises(RunStoreError, match="ambiguous") as ambiguous:
        store.resolve(deployed.run_id)
    assert f"{deployed.run_id} (site-run)" in str(ambiguous.value)
    assert f"{deployed.run_id} (site-run-copy)" in str(ambiguous.value)
    assert store.resolve("site-run-copy") == root / "site-run-copy"
