"""Comparing runs: which settings differ, and the metrics they share side by side, round by round. Pure functions
over what the run store returns, for ``fedloom runs compare`` (and, later, the dashboard)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["ABSENT", "config_diff", "flatten", "metric_table", "sample_rounds", "shared_metrics"]

#: What :func:`config_diff` gives for a setting a config does not have.
ABSENT = "(absent)"

# Metrics that say how a run went, listed first where present; other shared metrics follow alphabetically.
_HEADLINE = ("central_accuracy", "central_loss", "federated_accuracy", "federated_loss", "fit_loss", "epsilon")


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"a.b.c": value}``; lists stay values (as JSON text, so they compare and print)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else value
    return flat


def config_diff(configs: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[str, list[Any]]], int]:
    """The settings on which ``configs`` differ, each with every config's value (:data:`ABSENT` where a config
    lacks it), in name order; and how many settings they all share with the same value."""
    flats = [flatten(c) for c in configs]
    names = sorted(set().union(*flats)) if flats else []
    differ = []
    same = 0
    for name in names:
        values = [flat.get(name, ABSENT) for flat in flats]
        if all(name in flat for flat in flats) and all(_equal(v, values[0]) for v in values):
            same += 1
        else:
            differ.append((name, values))
    return differ, same


def shared_metrics(rounds_by_run: Sequence[Sequence[Mapping[str, Any]]], columns: Sequence[str]) -> list[str]:
    """The metrics every run recorded in at least one round (not the bookkeeping ``columns``): the headline ones
    first, in a fixed order, then the rest alphabetically."""
    recorded = [{k for row in rows for k, v in row.items() if v is not None} - set(columns) for rows in rounds_by_run]
    shared = set.intersection(*recorded) if recorded else set()
    return [m for m in _HEADLINE if m in shared] + sorted(shared - set(_HEADLINE))


def sample_rounds(rounds: Sequence[int], most: int) -> list[int]:
    """At most ``most`` of ``rounds`` (sorted), evenly spaced, always with the first and the last."""
    ordered = sorted(set(rounds))
    if len(ordered) <= most or most < 2:
        return ordered[:most] if most < 2 else ordered
    step = (len(ordered) - 1) / (most - 1)
    return sorted({ordered[round(i * step)] for i in range(most)})


def metric_table(
    rounds_by_run: Sequence[Sequence[Mapping[str, Any]]], metric: str, most: int
) -> list[tuple[int, list[float | None]]]:
    """``metric`` round by round, one value per run (``None`` where a run did not record that round), over at
    most ``most`` rounds of all the runs' rounds (see :func:`sample_rounds`)."""
    by_run = [{int(row["round"]): row.get(metric) for row in rows} for rows in rounds_by_run]
    every = [r for values in by_run for r in values]
    return [(r, [values.get(r) for values in by_run]) for r in sample_rounds(every, most)]


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return bool(a == b) and type(a) is type(b)
