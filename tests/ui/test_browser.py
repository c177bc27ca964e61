"""The dashboard in headless Chromium (Debian's, driven by Playwright) against ``fedloom ui`` serving real runs:
two finished simulations and a run recorded while the page watches. Each main view is saved as a PNG in
``artifacts/screenshots/`` (``$FEDLOOM_SCREENSHOTS``)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dashboard_server import COMMAND, SCREENSHOTS, dashboard
from federation_runs import PARAMS, record_run, round_record

from fedloom.tracking import RunStore

# A dashboard server process, driven by headless Chromium.
pytestmark = pytest.mark.integration

pytest.importorskip("fastapi")

ROUNDS = 3
CLIENTS = 20
# seed2 runs a job whose clients log: a line with each fit, a warning with each evaluation of round 1.
SIMULATED = {"seed1": ["digits", "--seed", "1"], "seed2": ["talking_digits.py", "--seed", "2", "--lr", "0.05"]}
TALKING_JOB = """\
import logging

import fedloom as fl
from fedloom.examples.digits import job as digits

log = logging.getLogger("talking_digits")


class Talking:
    def __getattr__(self, name):
        return getattr(digits.task, name)

    def fit(self, params, data, config, **kwargs):
        result = digits.task.fit(params, data, config, **kwargs)
        log.info("trained on %d examples in round %d", result.num_examples, fl.context.server_round)
        fl.context.log_metric("examples_seen", result.num_examples * config.local_epochs)
        return result

    def evaluate(self, params, data):
        if fl.context.server_round == 1:
            log.warning("round 1: evaluating a model trained for one round")
        return digits.task.evaluate(params, data)


job = fl.Job(name="digits", task=Talking(), data=digits.data, strategy=digits.strategy, simulation=digits.simulation)
"""
READY_MS = 15_000


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two finished digits simulations (20 clients, 3 rounds; they differ in seed and learning rate, and the
    clients of the second log lines)."""
    root = tmp_path_factory.mktemp("ui-runs")
    (root / "talking_digits.py").write_text(TALKING_JOB)
    processes = [
        subprocess.Popen(
            [*COMMAND, "simulate", *args, "--rounds", str(ROUNDS), "--clients", str(CLIENTS), "--out", str(root)],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for args in SIMULATED.values()
    ]
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output
    return root


@pytest.fixture(scope="module")
def address(runs: Path) -> Iterator[str]:
    with dashboard(runs) as url:
        yield url


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    yield tab
    context.close()
    assert errors == [], errors  # no script error on any view


def _open(page: Any, url: str, view: str) -> None:
    page.goto(url)
    page.wait_for_selector(f"body[data-ready='{view}']", timeout=READY_MS)


def _shot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def _points(page: Any) -> dict[str, tuple[int, int]]:
    """Per chart (by metric): its circles and the vertices of its line."""
    found = page.eval_on_selector_all(
        "svg.chart",
        """charts => Object.fromEntries(charts.map(c => [c.dataset.metric,
            [c.querySelectorAll('circle.point').length,
             c.querySelector('polyline').getAttribute('points').trim().split(/\\s+/).length]]))""",
    )
    return {metric: (circles, vertices) for metric, (circles, vertices) in found.items()}


def _ref(runs: Path, name: str) -> str:
    """The run simulated with ``SIMULATED[name]`` (both are named digits; their seeds tell them apart)."""
    store = RunStore(runs)
    seed = int(SIMULATED[name][2])
    return next(i.path.name for i in store.list_runs() if store.config(i.run_id)["simulation"]["seed"] == seed)


def test_run_list_and_a_finished_run(page: Any, address: str, runs: Path) -> None:
    _open(page, address, "runs")
    rows = page.locator("#runs tbody tr")
    assert rows.count() == 2
    assert "finished" in rows.first.inner_text()
    _shot(page, "runs")
    page.click(f"a.run:has-text('{_ref(runs, 'seed1')}')")
    page.wait_for_selector("body[data-ready='run']", timeout=READY_MS)
    charts = _points(page)
    assert {"central_accuracy", "federated_accuracy", "fit_loss"} <= set(charts)
    assert all(counts == (ROUNDS, ROUNDS) for counts in charts.values()), charts
    heat = page.locator("#heatmap")
    assert (heat.get_attribute("data-clients"), heat.get_attribute("data-rounds")) == ("20", str(ROUNDS))
    assert page.locator("#timeline").get_attribute("data-rounds") == str(ROUNDS)
    assert page.locator("#profile tbody tr").count() == 20
    assert page.locator("#rounds tbody tr").count() == ROUNDS
    _shot(page, "run")


def test_click_into_a_client(page: Any, address: str, runs: Path) -> None:
    ref = _ref(runs, "seed1")
    _open(page, f"{address}#/run/{ref}", "run")
    page.click("a.client:text-is('client-004')")
    page.wait_for_selector("body[data-ready='client']", timeout=READY_MS)
    assert page.url.endswith(f"#/run/{ref}/client/client-004")
    assert page.locator("h1").inner_text() == "Client client-004"
    assert page.locator("#records tbody tr").count() == 2 * ROUNDS  # a fit and an evaluation each round
    assert _points(page)["evaluate accuracy"] == (ROUNDS, ROUNDS)
    _shot(page, "client")
    # The heat map's rows open their client too: the middle of row 8 (client-007).
    _open(page, f"{address}#/run/{ref}", "run")
    page.locator("#heatmap").scroll_into_view_if_needed()
    box = page.locator("#heatmap").bounding_box()
    page.mouse.click(box["x"] + box["width"] - 3, box["y"] + box["height"] * 7.5 / 20)
    page.wait_for_selector("body[data-ready='client']", timeout=READY_MS)
    assert page.url.endswith("/client/client-007")


def _log_rows(page: Any, query: str) -> list[list[str]]:
    """The log table's rows (round, client, level, message) once the section shows ``query`` (text|level|client)."""
    page.wait_for_selector(f"#logs-section[data-query='{query}']", timeout=READY_MS)
    return page.eval_on_selector_all(
        "#logs tbody tr", "rows => rows.map(r => [1, 2, 4, 6].map(i => r.cells[i].innerText))"
    )


def test_search_the_lines_clients_logged(page: Any, address: str, runs: Path) -> None:
    ref = _ref(runs, "seed2")
    _open(page, f"{address}#/run/{ref}", "run")
    everything = _log_rows(page, "||")
    assert len(everything) == CLIENTS * ROUNDS + CLIENTS  # a line per fit, a warning per evaluation in round 1
    assert page.locator("#log-count").inner_text() == f"{CLIENTS * ROUNDS + CLIENTS} lines"
    page.fill("#log-search", "Round 2")
    found = _log_rows(page, "Round 2||")
    assert len(found) == CLIENTS
    assert all(row[0] == "2" and row[2] == "INFO" and row[3].endswith("examples in round 2") for row in found)
    page.select_option("#log-level", "WARNING")
    assert _log_rows(page, "Round 2|WARNING|") == []
    assert page.locator("#log-count").inner_text() == "no lines"
    page.fill("#log-search", "")
    warnings = _log_rows(page, "|WARNING|")
    assert sorted(row[1] for row in warnings) == [f"client-{i:03d}" for i in range(CLIENTS)]
    page.select_option("#log-client", "client-004")
    assert _log_rows(page, "|WARNING|client-004") == [
        ["1", "client-004", "WARNING", "round 1: evaluating a model trained for one round"]
    ]
    page.locator("#logs-section").scroll_into_view_if_needed()
    _shot(page, "logs")
    # The client's page keeps the level chosen and shows that client's lines, and charts what it logged.
    page.click("#logs a.client:text-is('client-004')")
    page.wait_for_selector("body[data-ready='client']", timeout=READY_MS)
    assert len(_log_rows(page, "|WARNING|client-004")) == 1
    page.select_option("#log-level", "")
    rows = _log_rows(page, "||client-004")
    assert [row[0] for row in rows] == ["1", "1", "2", "3"]  # round 1: its warning and its fit line
    assert _points(page)["fit examples_seen"] == (ROUNDS, ROUNDS)
    assert _points(page)["fit sys_peak_rss_mb"] == (ROUNDS, ROUNDS)


def test_compare_two_runs(page: Any, address: str, runs: Path) -> None:
    _open(page, address, "runs")
    assert page.locator("input.pick").count() == 2
    for name in ("seed1", "seed2"):  # the compare page shows runs in the order they were ticked
        page.locator(f"input.pick[value='{_ref(runs, name)}']").check()
    page.click("#compare")
    page.wait_for_selector("body[data-ready='compare']", timeout=READY_MS)
    lines = page.eval_on_selector_all("svg.chart", "cs => cs.map(c => c.querySelectorAll('polyline').length)")
    assert lines
    assert all(n == 2 for n in lines)
    assert all(circles == 2 * ROUNDS for circles, _ in _points(page).values())
    differ = page.locator("#differ").inner_text()
    assert re.search(r"simulation\.seed\s+1\s+2", differ), differ
    assert "strategy.fit.lr" in differ
    _shot(page, "compare")


def test_a_live_run_updates_in_place(page: Any, browser: Any, tmp_path: Path) -> None:
    recorder = record_run(tmp_path, "live", rounds=1, clients=4, finish=False, epsilon=True)
    with dashboard(tmp_path) as url:
        ref = next(tmp_path.iterdir()).name
        _open(page, f"{url}#/run/{ref}", "run")
        assert page.locator("#live").is_visible()
        assert _points(page)["central_accuracy"] == (1, 1)
        for server_round in (2, 3):
            recorder.on_round(round_record(server_round, 4, epsilon=True), PARAMS)
            page.wait_for_selector(f"body[data-rounds='{server_round}']", timeout=READY_MS)
            assert _points(page)["central_accuracy"] == (server_round, server_round)
            assert _points(page)["epsilon"] == (server_round, server_round)
        assert page.locator("#timeline").get_attribute("data-rounds") == "3"
        _shot(page, "live")
        recorder.finish(PARAMS)
        page.wait_for_selector("body[data-status='finished']", timeout=READY_MS)
        assert page.locator("#live").is_hidden()
