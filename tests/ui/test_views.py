"""``fedloom.tracking.views``: what the dashboard shows, checked against values computed by hand."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from federation_runs import DROPPED, LATE, REFUSED, accuracy_of, fit_status, lines_of, record_run, rss_of

from fedloom.core.errors import ConfigError, RunStoreError
from fedloom.tracking import RunStore, views

ROUNDS, CLIENTS = 4, 5


@pytest.fixture
def store(tmp_path: Path, db_url: str | None) -> RunStore:
    """Two runs of the hand-made federation, in each run store backend in turn: the views aggregate in SQL (JSON
    fields included), which SQLite and PostgreSQL spell differently."""
    second = {"simulation": {"num_clients": 3, "seed": 9}}
    record_run(tmp_path, "first", rounds=ROUNDS, clients=CLIENTS, url=db_url)
    record_run(tmp_path, "second", rounds=2, clients=3, config=second, epsilon=True, url=db_url)
    return RunStore(tmp_path, db_url)


def _ref(store: RunStore, name: str) -> str:
    return next(info.path.name for info in store.list_runs() if info.name == name)


def test_overview_lists_strategy_clients_best_and_epsilon(store: RunStore) -> None:
    by_name = {row["name"]: row for row in (views.overview(store, info) for info in store.list_runs())}
    first, second = by_name["first"], by_name["second"]
    assert (first["strategy"], first["clients"], first["rounds"]) == ("FedAvg", CLIENTS, ROUNDS)
    assert first["best"] == {"name": "central_accuracy", "value": ROUNDS / 10, "round": ROUNDS}
    assert first["epsilon"] is None
    assert second["epsilon"] == pytest.approx(1.0)  # 0.5 per round, 2 rounds
    assert first["ref"] == _ref(store, "first")


def test_best_metric_prefers_accuracy_and_takes_the_lowest_loss() -> None:
    rows = [{"round": 1, "fit_loss": 0.5}, {"round": 2, "fit_loss": 0.2}, {"round": 3, "fit_loss": 0.3}]
    assert views.best_metric(rows) == {"name": "fit_loss", "value": 0.2, "round": 2}
    rows[0]["federated_accuracy"] = 0.9
    assert views.best_metric(rows) == {"name": "federated_accuracy", "value": 0.9, "round": 1}
    assert views.best_metric([{"round": 1, "fit_loss": float("nan")}]) is None


def test_run_detail_separates_privacy_bookkeeping(store: RunStore) -> None:
    detail = views.run_detail(store, _ref(store, "second"))
    assert detail["metrics"] == ["central_accuracy", "fit_loss"]
    assert detail["privacy"] == {"epsilon": [[1, 0.5], [2, 1.0]], "delta": 1e-5, "protection": None}
    assert [row["round"] for row in detail["rounds"]] == [1, 2]
    assert detail["config"]["simulation"]["seed"] == 9


def test_participation_has_one_letter_per_round(store: RunStore) -> None:
    view = views.clients_view(store, _ref(store, "first"))
    assert view["rounds"] == list(range(1, ROUNDS + 1))
    letters = {"ok": "t", "dropped": "d", "late": "l", "refused": "r"}
    for i, row in enumerate(view["clients"]):
        cid = f"client-{i:03d}"
        assert row["client_id"] == cid
        assert row["participation"] == "".join(letters[fit_status(cid, r)] for r in range(1, ROUNDS + 1))
    counts = {row["client_id"]: row for row in view["clients"]}
    for (cid, _), label in ((DROPPED, "dropped"), (LATE, "late"), (REFUSED, "refused")):
        assert counts[cid][label] == 1
        assert counts[cid]["trained"] == ROUNDS - 1


def test_heatmap_places_each_value_in_its_cell(store: RunStore) -> None:
    heat = views.heatmap(store, _ref(store, "first"), "accuracy")
    assert heat["clients"] == [f"client-{i:03d}" for i in range(CLIENTS)]
    for i in range(CLIENTS):
        assert heat["values"][i] == pytest.approx([accuracy_of(i, r) for r in range(1, ROUNDS + 1)])
    fit_loss = views.heatmap(store, _ref(store, "first"), "fit_loss")
    row = fit_loss["values"][1]  # client-001 dropped in round 2: no fit loss there
    assert row[DROPPED[1] - 1] is None
    assert row[0] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="unknown heat map metric 'nope'"):
        views.heatmap(store, _ref(store, "first"), "nope")


def test_profile_aggregates_in_the_database(store: RunStore) -> None:
    rows = {row["client_id"]: row for row in views.profile(store, _ref(store, "first"))}
    for i in range(CLIENTS):
        cid = f"client-{i:03d}"
        ok_rounds = [r for r in range(1, ROUNDS + 1) if fit_status(cid, r) == "ok"]
        row = rows[cid]
        assert row["fits"] == len(ok_rounds)
        assert row["fit_seconds"] == pytest.approx(0.1 * (i + 1))
        assert row["evaluate_seconds"] == pytest.approx(0.01)
        assert row["bytes_down"] == 1000 * (len(ok_rounds) + ROUNDS)  # completed fits and evaluations
        assert row["bytes_up"] == 500 * len(ok_rounds) + 100 * ROUNDS
        assert row["peak_rss_mb"] == pytest.approx(max(rss_of(i, r) for r in ok_rounds))
        assert row["cpu_seconds"] == pytest.approx(0.5)
        assert row["gpu_util"] is None


def _all_lines() -> list[tuple[int, str, str]]:
    """Every line the first run's clients sent, as (round, client, text), in the order recorded."""
    return [
        (r, f"client-{i:03d}", line.message)
        for r in range(1, ROUNDS + 1)
        for i in range(CLIENTS)
        if fit_status(f"client-{i:03d}", r) != "dropped"
        for line in lines_of(f"client-{i:03d}", r)
    ]


def test_logs_are_kept_per_client_in_the_order_they_came(store: RunStore) -> None:
    found = views.logs_view(store, _ref(store, "first"), limit=5000)
    expected = _all_lines()
    assert found["matched"] == len(expected) == 4 * 5 - 3 + 5 + 1  # trained, round 1's warnings, one refusal
    assert [(x["round"], x["client_id"], x["message"]) for x in found["lines"]] == expected
    assert [x["seq"] for x in found["lines"]] == list(range(1, len(expected) + 1))
    assert found["clients"] == [f"client-{i:03d}" for i in range(CLIENTS)]
    first = found["lines"][0]
    assert (first["phase"], first["level"], first["logger"], first["at"]) == (
        "fit",
        "INFO",
        "job.train",
        "2026-01-01T12:01:00+00:00",
    )


def test_logs_are_searched_by_text_client_level_and_round(store: RunStore) -> None:
    ref = _ref(store, "first")
    lines = _all_lines()

    def search(**filters):
        found = views.logs_view(store, ref, **filters)
        return found["matched"], [(x["round"], x["client_id"], x["message"]) for x in found["lines"]]

    assert search(text="ROUND 3") == (
        len([x for x in lines if "round 3" in x[2]]),
        [x for x in lines if "round 3" in x[2]],
    )
    assert search(text="job.DATA")[0] == CLIENTS  # the logger's name matches too
    assert search(text="100%_") == (1, [(REFUSED[1], REFUSED[0], lines_of(*REFUSED)[-1].message)])  # no wildcards
    assert (search(text="_grad")[0], search(text="%")[0]) == (1, 1)
    assert search(client="client-002") == (
        len([x for x in lines if x[1] == "client-002"]),
        [x for x in lines if x[1] == "client-002"],
    )
    assert search(level="warning")[0] == CLIENTS + 1  # warnings and the error
    assert search(level="ERROR")[0] == 1
    assert search(server_round=2, text="trained")[0] == CLIENTS - 1  # client-001 dropped in round 2
    matched, last = search(limit=3)
    assert (matched, last) == (len(lines), lines[-3:])
    assert search(text="nothing like this") == (0, [])


def test_logs_refuse_an_unknown_level_and_a_silly_limit(store: RunStore) -> None:
    ref = _ref(store, "first")
    with pytest.raises(ConfigError, match="unknown log level 'LOUD'; choose one of INFO, WARNING, ERROR, CRITICAL"):
        views.logs_view(store, ref, level="LOUD")
    for limit in (0, 5001):
        with pytest.raises(ConfigError, match="between 1 and 5000"):
            views.logs_view(store, ref, limit=limit)


def test_a_run_recorded_before_clients_sent_logs_has_none(tmp_path: Path) -> None:
    recorder = record_run(tmp_path, "old", rounds=1, clients=2)
    with sqlite3.connect(recorder.run_dir / "run.db") as conn:
        conn.execute("DROP TABLE client_logs")
    assert views.logs_view(RunStore(tmp_path), recorder.run_id) == {"lines": [], "matched": 0, "clients": []}


def test_client_detail_and_its_errors(store: RunStore) -> None:
    ref = _ref(store, "first")
    detail = views.client_detail(store, ref, REFUSED[0])
    assert len(detail["records"]) == 2 * ROUNDS
    refused = next(r for r in detail["records"] if r["phase"] == "fit" and r["round"] == REFUSED[1])
    assert (refused["status"], refused["detail"]) == ("refused", "update norm too large")
    ok = next(r for r in detail["records"] if r["phase"] == "fit" and r["round"] == 2)
    assert ok["metrics"]["sys_peak_rss_mb"] == rss_of(3, 2)
    assert detail["events"] == []
    with pytest.raises(RunStoreError, match="has no client 'client-999'"):
        views.client_detail(store, ref, "client-999")


def test_compare_view_diffs_configs_and_aligns_series(store: RunStore) -> None:
    data = views.compare_view(store, [_ref(store, "first"), _ref(store, "second")])
    assert {d["name"]: d["values"] for d in data["differ"]} == {
        "simulation.num_clients": [CLIENTS, 3],
        "simulation.seed": [0, 9],
    }
    assert data["metrics"][:2] == ["central_accuracy", "fit_loss"]
    assert [len(series) for series in data["series"]["central_accuracy"]] == [ROUNDS, 2]
    assert data["series"]["central_accuracy"][1] == [[1, 0.1], [2, 0.2]]
    with pytest.raises(ConfigError, match="at least two runs"):
        views.compare_view(store, [_ref(store, "first")])


def test_views_of_a_missing_run_raise_run_store_errors(tmp_path: Path) -> None:
    with pytest.raises(RunStoreError, match="no run matches"):
        views.clients_view(RunStore(tmp_path), "nothing")
