"""Aggregation maths: pure functions over arrays that never mutate their inputs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedloom.core.errors import ConfigError
from fedloom.core.params import Params

__all__ = ["weighted_mean", "weighted_mean_scalar"]


def weighted_mean(params: Sequence[Params], weights: Sequence[float]) -> Params:
    """Return ``sum_k w_k p_k / sum_k w_k``, name by name, in the order of ``params[0]``.

    Sums are taken in float64 and cast back to each array's dtype; integer arrays (batch-norm counters) are
    rounded to the nearest integer. Raises :class:`ConfigError` when the inputs disagree in names or shapes,
    when there is nothing to average, or when the weights are negative or sum to zero.
    """
    if not params:
        raise ConfigError("cannot average an empty list of params")
    if len(params) != len(weights):
        raise ConfigError(f"got {len(params)} params but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ConfigError(f"weights must be finite, non-negative and sum to > 0, got {list(weights)}")
    w = w / w.sum()
    reference = params[0]
    for i, p in enumerate(params[1:], start=1):
        if list(p) != list(reference) or any(p[k].shape != reference[k].shape for k in reference):
            raise ConfigError(f"params #{i} do not match params #0 in names or shapes")
    out = {}
    for name, first in reference.items():
        total = np.zeros(first.shape, dtype=np.float64)
        for wk, p in zip(w, params, strict=True):
            total += wk * p[name].astype(np.float64)
        if np.issubdtype(first.dtype, np.integer) or first.dtype == np.bool_:
            total = np.rint(total)
        out[name] = total.astype(first.dtype)
    return Params(out)


def weighted_mean_scalar(values: Sequence[float], weights: Sequence[float]) -> float:
    """Weighted mean of scalars (metrics weighted by example counts); ``nan`` when the weights sum to 0."""
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        return float("nan")
    return float(np.dot(np.asarray(values, dtype=np.float64), w) / w.sum())
