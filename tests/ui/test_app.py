"""The dashboard's JSON API and its access rules, through FastAPI's test client (requests go through the whole
ASGI app: middleware, routes and error handlers)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from federation_runs import PARAMS, record_run, round_record

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from fedloom.tracking import RunRecorder
from fedloom.ui import create_app
from fedloom.ui.app import COOKIE

LOCAL = "http://127.0.0.1"


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    record_run(tmp_path, "alpha", rounds=3, clients=4)
    record_run(tmp_path, "beta", rounds=2, clients=4, config={"simulation": {"num_clients": 4, "seed": 3}})
    return tmp_path


def test_api_answers_every_view(runs: Path) -> None:
    client = TestClient(create_app(runs), base_url=LOCAL)
    listed = client.get("/api/runs").json()
    assert sorted(r["name"] for r in listed) == ["alpha", "beta"]
    alpha = next(r["ref"] for r in listed if r["name"] == "alpha")
    beta = next(r["ref"] for r in listed if r["name"] == "beta")
    assert [r["round"] for r in client.get(f"/api/runs/{alpha}").json()["rounds"]] == [1, 2, 3]
    assert len(client.get(f"/api/runs/{alpha}/clients").json()["clients"]) == 4
    assert client.get(f"/api/runs/{alpha}/heatmap", params={"metric": "loss"}).json()["metric"] == "loss"
    assert len(client.get(f"/api/runs/{alpha}/profile").json()) == 4
    assert len(client.get(f"/api/runs/{alpha}/clients/client-000").json()["records"]) == 6
    logs = client.get(f"/api/runs/{alpha}/logs", params={"q": "ROUND 2", "client": "client-003", "round": 2}).json()
    assert [line["message"] for line in logs["lines"]] == ["client-003 trained in round 2"]
    assert logs["matched"] == 1
    compared = client.get("/api/compare", params=[("run", alpha), ("run", beta)]).json()
    assert "simulation.seed" in {d["name"] for d in compared["differ"]}
    page = client.get("/")
    assert page.status_code == 200
    assert '<script src="/static/app.js">' in page.text
    assert client.get("/static/app.js").status_code == 200


def test_bad_requests_get_4xx_with_a_message(runs: Path) -> None:
    client = TestClient(create_app(runs), base_url=LOCAL)
    missing = client.get("/api/runs/nothing-like-it")
    assert missing.status_code == 404
    assert "no run matches 'nothing-like-it'" in missing.json()["detail"]
    ref = client.get("/api/runs").json()[0]["ref"]
    bad_metric = client.get(f"/api/runs/{ref}/heatmap", params={"metric": "bogus"})
    assert bad_metric.status_code == 400
    assert "unknown heat map metric" in bad_metric.json()["detail"]
    assert client.get(f"/api/runs/{ref}/clients/nobody").status_code == 404
    assert client.get("/api/compare", params={"run": ref}).status_code == 400
    bad_level = client.get(f"/api/runs/{ref}/logs", params={"level": "LOUD"})
    assert bad_level.status_code == 400
    assert "unknown log level 'LOUD'" in bad_level.json()["detail"]
    assert client.get(f"/api/runs/{ref}/logs", params={"limit": 0}).status_code == 400
    bad_round = client.get(f"/api/runs/{ref}/logs", params={"round": "second"})
    assert bad_round.status_code == 422
    assert "round" in str(bad_round.json()["detail"])


def test_a_run_in_progress_is_read_again_after_each_round(tmp_path: Path, db_url: str | None) -> None:
    recorder = record_run(tmp_path, "live", rounds=1, clients=3, finish=False, url=db_url)
    # As a context manager the client runs the app's lifespan: the warm-up computes the run's page beside these
    # requests, and is stopped when the app shuts down.
    with TestClient(create_app(tmp_path, db_url=db_url), base_url=LOCAL) as client:
        assert _warmers() == 1
        ref = client.get("/api/runs").json()[0]["ref"]
        first = client.get(f"/api/runs/{ref}").json()
        assert (first["run"]["status"], first["run"]["rounds"]) == ("running", 1)
        recorder.on_round(round_record(2, 3), PARAMS)
        assert client.get(f"/api/runs/{ref}").json()["run"]["rounds"] == 2
        assert client.get(f"/api/runs/{ref}/clients").json()["rounds"] == [1, 2]
        recorder.finish(PARAMS)
        assert client.get(f"/api/runs/{ref}").json()["run"]["status"] == "finished"
    assert _warmers() == 0


def test_a_deployments_pages_answer_to_its_run_id(tmp_path: Path, db_url: str | None) -> None:
    # A deployment's folder is named by its operator (--run-dir runs/site-run); its run id is what its server
    # printed and the run list shows, so a page's address may hold either.
    other = record_run(tmp_path, "other", rounds=1, clients=2, url=db_url)
    deployed, _ = RunRecorder.open(tmp_path / "site-run", "digits", {"simulation": {"num_clients": 3}}, url=db_url)
    for r in (1, 2):
        deployed.on_round(round_record(r, 3), PARAMS)
    deployed.finish(PARAMS)
    client = TestClient(create_app(tmp_path, db_url=db_url), base_url=LOCAL)
    listed = {run["run_id"]: run["ref"] for run in client.get("/api/runs").json()}
    assert listed == {deployed.run_id: "site-run", other.run_id: other.run_id}
    prefix = deployed.run_id[: deployed.run_id.index("-digits-") + 2]
    for ref in (deployed.run_id, prefix, "site-run"):
        page = client.get(f"/api/runs/{ref}")
        assert page.status_code == 200, (ref, page.text)
        assert (page.json()["run"]["run_id"], page.json()["run"]["rounds"]) == (deployed.run_id, 2)
        assert client.get(f"/api/runs/{ref}/clients").json()["rounds"] == [1, 2]
        assert len(client.get(f"/api/runs/{ref}/clients/client-000").json()["records"]) == 4
    compared = client.get("/api/compare", params=[("run", deployed.run_id), ("run", other.run_id)])
    assert [run["run_id"] for run in compared.json()["runs"]] == [deployed.run_id, other.run_id]


def _warmers() -> int:
    return sum(thread.name == "fedloom-ui-warm" and thread.is_alive() for thread in threading.enumerate())


def test_loopback_dashboard_refuses_other_host_names(runs: Path) -> None:
    # A page on another site that resolves its own name to 127.0.0.1 (DNS rebinding) sends that name as Host.
    client = TestClient(create_app(runs), base_url="http://attacker.example")
    assert client.get("/api/runs").status_code == 400
    assert TestClient(create_app(runs), base_url="http://localhost:8765").get("/api/runs").status_code == 200


def test_token_is_required_on_every_request(runs: Path) -> None:
    token = "s3cret-token"
    app = create_app(runs, token=token, loopback_only=False)
    client = TestClient(app, base_url="http://10.1.2.3:8765", follow_redirects=False)
    refused = client.get("/api/runs")
    assert refused.status_code == 401
    assert "needs its token" in refused.json()["detail"]
    assert client.get("/", params={"token": "wrong"}).status_code == 401
    assert client.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/runs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    # Opening the printed address sets the cookie and drops the token from the address.
    opened = client.get("/", params={"token": token})
    assert opened.status_code == 303
    assert opened.headers["location"] == "http://10.1.2.3:8765/"
    assert f"{COOKIE}={token}" in opened.headers["set-cookie"]
    assert "httponly" in opened.headers["set-cookie"].lower()
    assert client.get("/api/runs").status_code == 200  # the client kept the cookie
