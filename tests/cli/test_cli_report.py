"""``fedloom report``: one self-contained HTML file with the numbers ``fedloom runs show`` prints."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Cli, CliResult

# Every test here runs the fedloom console script in a subprocess (tests/cli/conftest.py); the modules that read
# the session's digits runs share an xdist group, so those runs are made once.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("digits_runs")]


class Tables(HTMLParser):
    """Every table of a page as rows of cell texts, and every attribute that could fetch something."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.fetching: list[tuple[str, str]] = []
        self.tags: set[str] = set()
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.fetching += [(k, v or "") for k, v in attrs if k in ("src", "href") or (v or "").startswith("url(")]
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_the_report_is_self_contained_and_shows_what_runs_show_shows(
    cli: Cli, digits_runs: dict[str, CliResult]
) -> None:
    run_dir = digits_runs["happy"].ok().run_dir(cli.cwd)
    written = cli.run("report", str(run_dir), "--out", "happy.html").ok()
    assert written.stdout.startswith("wrote happy.html (")
    page = (cli.cwd / "happy.html").read_text()
    parsed = Tables()
    parsed.feed(page)
    assert parsed.fetching == []  # no src, no href, no url(): it opens offline
    assert "script" not in parsed.tags
    assert "@import" not in page
    shown = cli.run("runs", "show", str(run_dir)).ok()
    lines = [line.split() for line in shown.stdout.splitlines()]
    header = next(line for line in lines if line[:2] == ["round", "seconds"])
    rows = [line for line in lines if line and line[0].isdigit()]
    rounds_table = next(t for t in parsed.tables if t and t[0][:2] == ["round", "seconds"])
    by_name = [dict(zip(rounds_table[0], row, strict=True)) for row in rounds_table[1:]]
    # Every cell `runs show` prints is the report's, to the digit (seconds aside: show prints them too, the same).
    assert len(by_name) == len(rows) == 2
    for shown_row, reported in zip(rows, by_name, strict=True):
        assert {name: reported[name] for name in header} == dict(zip(header, shown_row, strict=True))
    # One point per round in the central accuracy chart, each titled with its value.
    chart = page[page.index("<figcaption>central_accuracy</figcaption>") :].split("</svg>")[0]
    assert len(re.findall(r'<circle class="point"', chart)) == 2
    for reported in by_name:
        assert f"round {reported['round']}: {reported['central_accuracy']}</title>" in chart
    clients = next(t for t in parsed.tables if t and t[0][0] == "client" and "fit ok" in t[0])
    assert [row[1] for row in clients[1:]] == ["2"] * 5  # 5 clients, each trained in both rounds
    assert "No differential privacy, secure aggregation or encryption was recorded." in page


def test_the_report_shows_the_privacy_spent(cli: Cli, digits_runs: dict[str, CliResult]) -> None:
    run_dir = digits_runs["dp"].ok().run_dir(cli.cwd)
    cli.run("report", str(run_dir), "--out", "dp.html").ok()
    page = (cli.cwd / "dp.html").read_text()
    assert "Epsilon spent after the last round: 2.7435 at delta 1e-05." in page
    secure = digits_runs["secagg"].ok().run_dir(cli.cwd)
    cli.run("report", str(secure), "--out", "secure.html").ok()
    assert "the server saw only their sum" in (cli.cwd / "secure.html").read_text()


def test_a_report_of_an_unknown_run_is_one_error_line(cli: Cli) -> None:
    assert "nope" in cli.run("report", "nope", "--runs", "runs").error()
