"""A run as one self-contained HTML file, for sharing: its summary, its curves, a table per client, the system
profile, the privacy it spent, and the config. Everything is inline (CSS and SVG charts, no script, no font or
image from anywhere), so the file opens offline and can be mailed as it is.

The numbers are the run store's, formatted as ``fedloom runs show`` formats them (four decimals).
"""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from fedloom.core.strictjson import finite_number
from fedloom.tracking.compare import shared_metrics
from fedloom.tracking.store import ROUND_COLUMNS, RunStore
from fedloom.tracking.views import SYSTEM_METRICS, profile

__all__ = ["number", "render_report"]

_CHART_W, _CHART_H, _PAD = 480, 200, 40
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; max-width: 70em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { padding: 2px 10px; text-align: right; }
th { border-bottom: 1px solid #999; } td:first-child, th:first-child { text-align: left; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; } figure { margin: 0; } figcaption { font-weight: 600; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; } .muted { color: #777; }
"""


def number(value: Any) -> str:
    """A value as the run tables print it (``fedloom runs show``, ``compare``, and this report): floats with four
    decimals, ``-`` for none or NaN."""
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4f}"
    return "-" if value is None else str(value)


def render_report(store: RunStore, ref: str) -> str:
    """The HTML report of run ``ref`` in ``store`` (see the module docstring)."""
    info = store.info(ref)
    rounds = store.rounds(ref)
    clients = store.client_metrics(ref)
    config = store.config(ref)
    metrics = shared_metrics([rounds], ROUND_COLUMNS)
    columns = (*ROUND_COLUMNS, *metrics)
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>fedloom run {_e(info.run_id)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Run {_e(info.run_id)}</h1>",
        _summary(info, config),
        "<h2>Curves</h2>",
        # Privacy metrics have their own section; epsilon is charted there.
        _charts(rounds, [m for m in metrics if m != "epsilon" and not m.startswith(("dp_", "secagg_", "he_"))]),
        "<h2>Rounds</h2>",
        _table(columns, [[number(row.get(c)) for c in columns] for row in rounds]),
        "<h2>Clients</h2>",
        _clients(clients),
        "<h2>System profile</h2>",
        _profile(profile(store, ref)),
        "<h2>Privacy</h2>",
        _privacy(rounds, config),
        "<h2>Config</h2>",
        f"<pre>{_e(json.dumps(config, indent=2, sort_keys=True))}</pre>",
        '<p class="muted">Written by fedloom report.</p></body></html>',
    ]
    return "\n".join(parts)


def _summary(info: Any, config: Mapping[str, Any]) -> str:
    strategy = config.get("strategy", {})
    rows = [
        ("name", info.name),
        ("status", info.status + (f": {info.error}" if info.error else "")),
        ("created", str(info.created_at)),
        ("finished", str(info.finished_at or "-")),
        ("rounds", str(info.rounds)),
        ("backend", str(config.get("backend", "-"))),
        ("strategy", str(strategy.get("type", "-")) if isinstance(strategy, Mapping) else str(strategy)),
        ("params_sha256", str(info.params_sha256 or "-")),
    ]
    rows += [(f"final {name}", number(value)) for name, value in sorted(info.final_metrics.items())]
    return _table(("", ""), rows)


def _charts(rounds: Sequence[Mapping[str, Any]], names: Sequence[str]) -> str:
    if not rounds or not names:
        return '<p class="muted">No metrics were recorded.</p>'
    figures = []
    for name in names:
        points = [(float(r["round"]), float(r[name])) for r in rounds if finite_number(r.get(name))]
        if points:
            figures.append(f"<figure><figcaption>{_e(name)}</figcaption>{line_chart({name: points})}</figure>")
    return f'<div class="charts">{"".join(figures)}</div>'


def line_chart(series: Mapping[str, Sequence[tuple[float, float]]]) -> str:
    """An inline SVG line chart of ``series`` (label -> points), with its axes' ranges written at the ends. Every
    point is a circle with a ``<title>``, so the chart holds its numbers (and a reader sees them on hover)."""
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    span_x, span_y = (x1 - x0) or 1.0, (y1 - y0) or 1.0

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            _PAD + (x - x0) / span_x * (_CHART_W - 2 * _PAD),
            _CHART_H - _PAD - (y - y0) / span_y * (_CHART_H - 2 * _PAD),
        )

    body = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_CHART_W}" height="{_CHART_H}" role="img">',
        f'<line x1="{_PAD}" y1="{_CHART_H - _PAD}" x2="{_CHART_W - _PAD}" y2="{_CHART_H - _PAD}" stroke="#999"/>',
        f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_CHART_H - _PAD}" stroke="#999"/>',
        f'<text x="{_PAD}" y="{_CHART_H - 10}" font-size="11">{_g(x0)}</text>',
        f'<text x="{_CHART_W - _PAD}" y="{_CHART_H - 10}" font-size="11" text-anchor="end">{_g(x1)}</text>',
        f'<text x="4" y="{_CHART_H - _PAD}" font-size="11">{_g(y0)}</text>',
        f'<text x="4" y="{_PAD}" font-size="11">{_g(y1)}</text>',
    ]
    for colour, (label, points) in zip(_COLOURS * len(series), series.items(), strict=False):
        coords = [at(x, y) for x, y in points]
        path = " ".join(f"{cx:.1f},{cy:.1f}" for cx, cy in coords)
        body.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')
        for (x, y), (cx, cy) in zip(points, coords, strict=True):
            tip = f"{_e(label)} round {_g(x)}: {number(y)}"
            body.append(
                f'<circle class="point" cx="{cx:.1f}" cy="{cy:.1f}" r="2" fill="{colour}"><title>{tip}</title></circle>'
            )
    body.append("</svg>")
    return "".join(body)


def _clients(clients: Sequence[Mapping[str, Any]]) -> str:
    """One row per client: how its fits went (ok, dropped, late, refused), its examples and its last accuracy."""
    if not clients:
        return '<p class="muted">No client records.</p>'
    by_client: dict[str, dict[str, Any]] = defaultdict(lambda: defaultdict(int))
    for row in clients:
        mine = by_client[row["client_id"]]
        if row["phase"] == "fit":
            mine[f"fit {row['status']}"] += 1
            mine["examples"] = max(mine["examples"], row["num_examples"] or 0)
        elif row["status"] == "ok" and row["accuracy"] is not None:
            mine["accuracy"] = row["accuracy"]
    columns = ("fit ok", "fit dropped", "fit late", "fit refused", "examples")
    rows = [
        [cid, *(str(mine.get(c, 0)) for c in columns), number(mine.get("accuracy"))]
        for cid, mine in sorted(by_client.items())
    ]
    return _table(("client", *columns, "last evaluated accuracy"), rows)


def _profile(rows: Sequence[Mapping[str, Any]]) -> str:
    """Per client (rows of :func:`fedloom.tracking.views.profile`): mean seconds per fit and per evaluation, the
    bytes received and sent in all, and the system metrics the clients reported."""
    if not rows:
        return '<p class="muted">No client records.</p>'
    system = [name.removeprefix("sys_") for name, _ in SYSTEM_METRICS]
    shown = [name for name in system if any(row[name] is not None for row in rows)]
    header = ("client", "mean fit s", "mean evaluate s", "bytes down", "bytes up", *shown)
    cells = [
        [
            row["client_id"],
            number(row["fit_seconds"]),
            number(row["evaluate_seconds"]),
            f"{row['bytes_down']:,}",
            f"{row['bytes_up']:,}",
            *(number(row[name]) for name in shown),
        ]
        for row in rows
    ]
    return _table(header, cells)


def _privacy(rounds: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> str:
    spent = [(float(r["round"]), float(r["epsilon"])) for r in rounds if finite_number(r.get("epsilon"))]
    protections = [
        name for name in ("secagg_survivors", "he_clients") if any(finite_number(r.get(name)) for r in rounds)
    ]
    lines = []
    if spent:
        delta = next((r.get("dp_delta") for r in reversed(rounds) if finite_number(r.get("dp_delta"))), None)
        lines.append(f"<p>Epsilon spent after the last round: {number(spent[-1][1])} at delta {_g(delta)}.</p>")
        lines.append(f"<figure><figcaption>epsilon</figcaption>{line_chart({'epsilon': spent})}</figure>")
    if "secagg_survivors" in protections:
        lines.append("<p>Updates were summed under secure aggregation: the server saw only their sum.</p>")
    if "he_clients" in protections:
        lines.append("<p>Updates were added under Paillier encryption: the server saw only ciphertexts.</p>")
    if not lines:
        lines.append('<p class="muted">No differential privacy, secure aggregation or encryption was recorded.</p>')
    return "".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _g(value: Any) -> str:
    return "-" if value is None else f"{value:g}"


def _e(text: Any) -> str:
    return html.escape(str(text))
