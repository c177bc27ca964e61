"""Aggregation maths: pure functions over arrays that never mutate their inputs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fedloom.core.errors import ConfigError
from fedloom.core.params import Params

__all__ = ["RunningMean", "weighted_mean", "weighted_mean_scalar"]


class RunningMean:
    """``sum_k w_k p_k / sum_k w_k``, name by name, folded in one ``Params`` at a time.

    A server adds each update as it arrives and keeps only float64 sums the size of one model, whatever the
    number of clients. :meth:`result` casts back to each array's dtype, rounding integer arrays (batch-norm
    counters) to the nearest integer. The sums depend on the order of :meth:`add` only in the last bits of
    float64, which casting to float32 almost always hides; add in a fixed order for bit-identical results.

    >>> mean = RunningMean()
    >>> mean.add(Params({"w": np.array([0.0, 2.0])}), 1)
    >>> mean.add(Params({"w": np.array([3.0, 2.0])}), 2)
    >>> mean.result()["w"]
    array([2., 2.])
    """

    def __init__(self) -> None:
        self._totals: dict[str, npt.NDArray[np.float64]] = {}
        self._layout: list[tuple[str, tuple[int, ...], np.dtype[Any]]] = []
        self._weight = 0.0
        self._count = 0

    @property
    def count(self) -> int:
        """How many params were added."""
        return self._count

    def add(self, params: Params, weight: float) -> None:
        """Fold in ``params`` with ``weight``. Raises :class:`ConfigError` for a negative or non-finite weight,
        and for params whose names or shapes differ from the first ones added."""
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"weights must be finite and non-negative, got {weight}")
        layout = [(name, array.shape, array.dtype) for name, array in params.items()]
        if not self._layout:
            self._layout = layout
            self._totals = {name: np.zeros(shape, dtype=np.float64) for name, shape, _ in layout}
        elif [(n, s) for n, s, _ in layout] != [(n, s) for n, s, _ in self._layout]:
            raise ConfigError(f"params #{self._count} do not match params #0 in names or shapes")
        for name, array in params.items():
            _add_scaled(self._totals[name].reshape(-1), array.reshape(-1), weight)
        self._weight += weight
        self._count += 1

    def result(self, dtype: type[np.floating[Any]] | None = None) -> Params:
        """The weighted mean so far, in each array's own dtype or, where given, in ``dtype`` (``np.float64``: the
        sums' precision, for a server optimizer). Raises :class:`ConfigError` when nothing was added or the
        weights sum to 0."""
        if not self._count:
            raise ConfigError("cannot average an empty list of params")
        if self._weight <= 0:
            raise ConfigError("weights must sum to > 0")
        out = {}
        for name, shape, own in self._layout:
            out[name] = np.empty(shape, own if dtype is None else dtype)
            rounded = bool(np.issubdtype(out[name].dtype, np.integer) or out[name].dtype == np.bool_)
            _scaled_into(out[name].reshape(-1), self._totals[name].reshape(-1), self._weight, rounded=rounded)
        return Params(out, copy=False)  # fresh arrays of its own


_BLOCK = 1 << 17  # values per step of _add_scaled: 1 MiB of float64 scratch, which stays in cache


def _add_scaled(total: npt.NDArray[np.float64], values: npt.NDArray[Any], weight: float) -> None:
    """``total += float64(values) * weight`` (1-d arrays), block by block: the same float64 arithmetic as on
    the whole arrays at once, without a temporary the size of a model (that is a large allocation for every
    update a server folds in, and page faults on fresh memory are most of its cost)."""
    scratch = np.empty(min(_BLOCK, total.size), dtype=np.float64)
    for start in range(0, total.size, _BLOCK):
        stop = min(start + _BLOCK, total.size)
        term = scratch[: stop - start]
        np.multiply(values[start:stop], weight, out=term, dtype=np.float64)
        total[start:stop] += term


def _scaled_into(out: npt.NDArray[Any], total: npt.NDArray[np.float64], weight: float, *, rounded: bool) -> None:
    """``out[:] = total / weight`` (rounded to the nearest integer first if ``rounded``), cast to ``out``'s dtype
    block by block, as ``(total / weight).astype(...)`` would, without a float64 temporary the size of a model."""
    scratch = np.empty(min(_BLOCK, total.size), dtype=np.float64)
    for start in range(0, total.size, _BLOCK):
        stop = min(start + _BLOCK, total.size)
        mean = scratch[: stop - start]
        np.divide(total[start:stop], weight, out=mean)
        if rounded:
            np.rint(mean, out=mean)
        out[start:stop] = mean


def weighted_mean(params: Sequence[Params], weights: Sequence[float]) -> Params:
    """Return ``sum_k w_k p_k / sum_k w_k``, name by name, in the order of ``params[0]`` (a
    :class:`RunningMean` fed in order).

    Sums are taken in float64 and cast back to each array's dtype; integer arrays (batch-norm counters) are
    rounded to the nearest integer. Raises :class:`ConfigError` when the inputs disagree in names or shapes,
    when there is nothing to average, or when the weights are negative or sum to zero.
    """
    if len(params) != len(weights):
        raise ConfigError(f"got {len(params)} params but {len(weights)} weights")
    mean = RunningMean()
    for p, w in zip(params, weights, strict=True):
        mean.add(p, float(w))
    return mean.result()


def weighted_mean_scalar(values: Sequence[float], weights: Sequence[float]) -> float:
    """Weighted mean of scalars (metrics weighted by example counts); ``nan`` when the weights sum to 0."""
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        return float("nan")
    return float(np.dot(np.asarray(values, dtype=np.float64), w) / w.sum())


# -- what the strategies share when they turn replies into a new model -------------------------------------


def fit_loss(results: Any) -> dict[str, float]:
    """The example-weighted mean of the clients' ``loss`` as ``fit_loss``, where every client reported one."""
    scored = [r for r in results if "loss" in r.metrics]
    if not scored or len(scored) != len(results):
        return {}
    return {"fit_loss": weighted_mean_scalar([r.metrics["loss"] for r in scored], [r.num_examples for r in scored])}


def f64(array: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """``array`` as float64 (itself where it already is)."""
    return array.astype(np.float64, copy=False)


def cast_like(reference: Params, arrays: Mapping[str, Any]) -> Params:
    """``arrays`` cast to ``reference``'s dtypes, integers rounded to the nearest (batch-norm counters)."""
    out = {}
    for name, like in reference.items():
        value = np.asarray(arrays[name])
        if np.issubdtype(like.dtype, np.integer) or like.dtype == np.bool_:
            value = np.rint(value)
        out[name] = value.astype(like.dtype)
    return Params(out, copy=False)
