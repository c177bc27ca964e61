"""Robust aggregation for Byzantine clients: pure functions over client updates that never mutate their inputs.

An *update* is a :class:`Params` holding a client's model minus the global model; all updates of one call have
the same names and shapes, in the same order. Every rule computes in float64 and returns fresh float64 arrays
with the names, shapes and order of ``updates[0]``. Where a norm or a distance is needed, an update is one vector:
its arrays flattened and concatenated in order. Updates are expected to be finite (the server rejects NaN and
infinity before aggregating); nothing here checks that again.

Every function raises :class:`ConfigError` for an empty list of updates, for updates whose names or shapes differ
from ``updates[0]``, and for arguments out of range (the message names the constraint).

The rules and their papers:

- :func:`clip_to_norm`: Sun et al. 2019, "Can You Really Backdoor Federated Learning?"
- :func:`coordinate_median`, :func:`trimmed_mean`: Yin et al. 2018, "Byzantine-Robust Distributed Learning:
  Towards Optimal Statistical Rates"
- :func:`krum_scores`, :func:`krum_select`, :func:`krum`: Blanchard et al. 2017, "Machine Learning with
  Adversaries: Byzantine Tolerant Gradient Descent"
- :func:`bulyan`: El Mhamdi et al. 2018, "The Hidden Vulnerability of Distributed Learning in Byzantium"

:class:`Mean`, :class:`Median`, :class:`TrimmedMean`, :class:`Krum` and :class:`Bulyan` wrap them as
:class:`Aggregator` values for a strategy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fedloom.core.errors import ConfigError
from fedloom.core.params import Params
from fedloom.strategy.aggregate import RunningMean

__all__ = [
    "Aggregator",
    "Bulyan",
    "Krum",
    "Mean",
    "Median",
    "TrimmedMean",
    "bulyan",
    "clip_to_norm",
    "coordinate_median",
    "krum",
    "krum_scores",
    "krum_select",
    "l2_norm",
    "trimmed_mean",
]

_Layout = list[tuple[str, tuple[int, ...]]]
_Matrix = npt.NDArray[np.float64]
_CoordinateRule = Callable[[_Matrix], npt.ArrayLike]


def l2_norm(update: Params) -> float:
    """The L2 norm of ``update`` as one vector: ``sqrt(sum of squares over all arrays)``, in float64.

    >>> l2_norm(Params({"w": np.array([3.0]), "b": np.array(4.0)}))
    5.0
    """
    # hypot of the per-array norms: no overflow from squaring large norms, and no copy of the whole update.
    return math.hypot(*(float(np.linalg.norm(np.asarray(a, dtype=np.float64).reshape(-1))) for a in update.values()))


def clip_to_norm(update: Params, max_norm: float) -> Params:
    """Norm bounding (Sun et al. 2019, "Can You Really Backdoor Federated Learning?"): ``update`` scaled by
    ``min(1, max_norm / l2_norm(update))``, so that the result's norm is at most ``max_norm``.

    An update already within the bound comes back unchanged (as float64). Raises :class:`ConfigError` unless
    ``max_norm > 0``.

    >>> clip_to_norm(Params({"w": np.array([3.0, 4.0])}), 1.0)["w"]
    array([0.6, 0.8])
    """
    if not max_norm > 0:
        raise ConfigError(f"clip_to_norm needs max_norm > 0, got {max_norm}")
    norm = l2_norm(update)
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    out = {name: np.multiply(array, scale, dtype=np.float64) for name, array in update.items()}
    return Params(out, copy=False)  # fresh arrays of its own


def coordinate_median(updates: Sequence[Params]) -> Params:
    """Coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates"): each value is the median of that value over the updates; for an even number of updates,
    the mean of the two middle values (as :func:`numpy.median`).

    Works one array name at a time, so besides the result it holds n copies of one array, not of the model.
    """
    return _coordinatewise(updates, _layout(updates), lambda stack: np.median(stack, axis=0))


def trimmed_mean(updates: Sequence[Params], beta: float) -> Params:
    """Coordinate-wise trimmed mean (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates"): for each value, drop the ``k = floor(beta * n)`` smallest and ``k`` largest of the
    ``n`` updates' values and average the other ``n - 2k``.

    ``beta = 0`` is the plain mean. Raises :class:`ConfigError` unless ``0 <= beta < 0.5`` (which leaves at least
    one value: ``2k <= 2 * beta * n < n``). Works one array name at a time, like :func:`coordinate_median`.
    """
    if not 0.0 <= beta < 0.5:
        raise ConfigError(f"trimmed mean needs 0 <= beta < 0.5, got beta={beta}")
    layout = _layout(updates)
    n = len(updates)
    k = math.floor(beta * n)
    if n - 2 * k < 1:  # cannot happen for beta < 0.5; kept so that the contract does not rest on rounding
        raise ConfigError(f"trimmed mean with beta={beta} drops 2k = {2 * k} of {n} updates and keeps none")
    return _coordinatewise(updates, layout, lambda stack: np.sort(stack, axis=0)[k : n - k].mean(axis=0))


def krum_scores(updates: Sequence[Params], f: int) -> npt.NDArray[np.float64]:
    """Krum scores (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
    Descent"): ``score_i`` is the sum of the squared L2 distances from update ``i`` to its ``n - f - 2`` closest
    other updates, ``f`` being the number of Byzantine updates to tolerate. Lower is more central.

    Raises :class:`ConfigError` unless ``f >= 0`` and ``n > 2f + 2``. Memory: an ``n x d`` float64 matrix of the
    flattened updates (``d`` values per update) and an ``n x n`` distance matrix; distances are taken from exact
    differences, not from ``|a|^2 + |b|^2 - 2ab``, which loses the small distances between close updates.
    """
    matrix, _ = _krum_matrix(updates, f)
    return _scores(_squared_distances(matrix), f)


def krum_select(updates: Sequence[Params], f: int, m: int = 1) -> list[int]:
    """The indices of the ``m`` updates with the lowest :func:`krum_scores`, lowest score first, ties broken by
    the lower index.

    Raises :class:`ConfigError` as :func:`krum_scores` does, and unless ``1 <= m <= n``.
    """
    matrix, _ = _krum_matrix(updates, f, m)
    return _select(_scores(_squared_distances(matrix), f), m)


def krum(updates: Sequence[Params], f: int, m: int = 1) -> Params:
    """Krum (``m = 1``: the update picked by :func:`krum_select`) or Multi-Krum (``m > 1``: the unweighted mean of
    the ``m`` picked updates), from Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent".

    Raises :class:`ConfigError` as :func:`krum_select` does. Memory as :func:`krum_scores`.
    """
    matrix, layout = _krum_matrix(updates, f, m)
    selected = _select(_scores(_squared_distances(matrix), f), m)
    return _unflatten(matrix[selected].mean(axis=0), layout)


def bulyan(updates: Sequence[Params], f: int) -> Params:
    """Bulyan over Krum (El Mhamdi et al. 2018, "The Hidden Vulnerability of Distributed Learning in Byzantium").

    1. Select ``theta = n - 2f`` updates by repeating Krum: each time, compute Krum scores (same ``f``) over the
       updates not yet selected, move the one with the lowest score (the lower index on ties) to the selection.
    2. For each value, average the ``beta = theta - 2f`` selected updates' values closest to the median of the
       selected updates' values (ties go to the update selected earlier).

    Raises :class:`ConfigError` unless ``f >= 0`` and ``n >= 4f + 3``, which makes ``theta >= 2f + 3`` and
    ``beta >= 3``. With ``f = 0`` the result is the plain mean.

    Krum's own condition (more than ``2f + 2`` updates) does not hold for the whole selection loop: the set
    shrinks from ``n`` to ``n - theta + 1 = 2f + 1`` updates, so the last two rounds run on ``2f + 2`` and
    ``2f + 1`` updates, whatever ``n`` is. There the number of neighbours ``n_remaining - f - 2`` is kept at 1 or
    more (at most ``n_remaining - 1``), so a round still picks the update closest to another. The second step
    is what bounds a Byzantine update that gets into the selection this way: each value drops the ``2f`` values
    farthest from the median.

    Memory: the ``n x d`` float64 matrix and ``n x n`` distances of :func:`krum_scores`, plus about three
    ``theta x d`` arrays for the second step.
    """
    if f < 0:
        raise ConfigError(f"Bulyan needs f >= 0, got f={f}")
    layout = _layout(updates)
    n = len(updates)
    if n < 4 * f + 3:
        raise ConfigError(f"Bulyan with f={f} needs at least 4f+3 = {4 * f + 3} updates, got {n}")
    matrix = _matrix(updates, layout)
    distances = _squared_distances(matrix)
    theta = n - 2 * f
    remaining = list(range(n))  # kept in ascending order, so argmin's first minimum is the lower index
    selection: list[int] = []
    for _ in range(theta):
        neighbours = min(max(len(remaining) - f - 2, 1), len(remaining) - 1)
        scores = _closest_sums(distances[np.ix_(remaining, remaining)], neighbours)
        selection.append(remaining.pop(int(np.argmin(scores))))
    selected = matrix[selection]
    median = np.median(selected, axis=0)
    closest = np.argsort(np.abs(selected - median), axis=0, kind="stable")[: theta - 2 * f]
    return _unflatten(np.take_along_axis(selected, closest, axis=0).mean(axis=0), layout)


class Aggregator(Protocol):
    """Turns a round's client updates, and each client's weight (its number of examples), into one update."""

    def __call__(self, updates: Sequence[Params], weights: Sequence[float]) -> Params: ...


@dataclass(frozen=True)
class Mean:
    """``sum_k w_k u_k / sum_k w_k``, name by name, in float64: the mean of FedAvg, with no robustness at all.

    Raises :class:`ConfigError` for an empty list, differing names or shapes, a number of weights other than the
    number of updates, a weight that is negative or not finite, and weights that sum to 0.
    """

    def __call__(self, updates: Sequence[Params], weights: Sequence[float]) -> Params:
        _layout(updates)
        _check_count(updates, weights)
        mean = RunningMean()  # FedAvg's own sums, which check the weights
        for update, weight in zip(updates, weights, strict=True):
            mean.add(update, float(weight))
        return mean.result(np.float64)


# The robust aggregators below take weights only to share the Aggregator signature, and check only how many there
# are: a weight is the example count a client reports, and a Byzantine client can report any count it likes, so
# weighting by it would hand the attacker back the influence that the rule takes away.


@dataclass(frozen=True)
class Median:
    """:func:`coordinate_median` of the updates; the weights are ignored, because a Byzantine client can lie about
    its example count."""

    def __call__(self, updates: Sequence[Params], weights: Sequence[float]) -> Params:
        _check_count(updates, weights)
        return coordinate_median(updates)


@dataclass(frozen=True)
class TrimmedMean:
    """:func:`trimmed_mean` with ``beta`` (``0 <= beta < 0.5``); the weights are ignored, because a Byzantine
    client can lie about its example count."""

    beta: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 0.5:
            raise ConfigError(f"trimmed mean needs 0 <= beta < 0.5, got beta={self.beta}")

    def __call__(self, updates: Sequence[Params], weights: Sequence[float]) -> Params:
        _check_count(updates, weights)
        return trimmed_mean(updates, self.beta)


@dataclass(frozen=True)
class Krum:
    """:func:`krum` tolerating ``f >= 0`` Byzantine updates, averaging the ``m >= 1`` best (Multi-Krum when
    ``m > 1``); the weights are ignored, because a Byzantine client can lie about its example count. A round
    needs more than ``2f + 2`` updates and at least ``m``."""

    f: int = 1
    m: int = 1

    def __post_init__(self) -> None:
        if self.f < 0:
            raise ConfigError(f"Krum needs f >= 0, got f={self.f}")
        if self.m < 1:
            raise ConfigError(f"Krum needs m >= 1, got m={self.m}")

    def __call__(self, updates: Sequence[Params], weights: Sequence[float]) -> Params:
        _check_count(updates, weights)
        return krum(updates, self.f, self.m)


@dataclass(frozen=True)
class Bulyan:
    """:func:`bulyan` tolerating ``f >= 0`` Byzantine updates; the weights are ignored, because a Byzantine client
    can lie about its example count. A round needs at least ``4f + 3`` updates."""

    f: int = 1

    def __post_init__(self) -> None:
        if self.f < 0:
            raise ConfigError(f"Bulyan needs f >= 0, got f={self.f}")

    def __call__(self, updates: Sequence[Params], weights: Sequence[float]) -> Params:
        _check_count(updates, weights)
        return bulyan(updates, self.f)


def _layout(updates: Sequence[Params]) -> _Layout:
    """Names and shapes of ``updates[0]``, after checking that every update has the same, in the same order."""
    if len(updates) == 0:
        raise ConfigError("cannot aggregate an empty list of updates")
    layout = [(name, array.shape) for name, array in updates[0].items()]
    names = [name for name, _ in layout]
    for i, update in enumerate(updates[1:], start=1):
        if list(update) != names:
            raise ConfigError(f"update #{i} {_first_name_difference(list(update), names)}")
        for name, shape in layout:
            if update[name].shape != shape:
                raise ConfigError(f"update #{i} has {name!r} of shape {update[name].shape}, update #0 has {shape}")
    return layout


def _first_name_difference(got: list[str], want: list[str]) -> str:
    """How names ``got`` first differ from ``want`` (update #0's), as the end of an error message."""
    pos, name, expected = next((j, a, b) for j, (a, b) in enumerate(itertools.zip_longest(got, want)) if a != b)
    if name is None:
        return f"lacks parameter {expected!r} of update #0"
    if expected is None:
        return f"has parameter {name!r} that update #0 lacks"
    return f"has parameter {name!r} at position {pos} where update #0 has {expected!r}"


def _check_count(updates: Sequence[Params], weights: Sequence[float]) -> None:
    if len(updates) != len(weights):
        raise ConfigError(f"got {len(updates)} updates but {len(weights)} weights")


def _coordinatewise(updates: Sequence[Params], layout: _Layout, rule: _CoordinateRule) -> Params:
    """``rule`` applied, name by name, to the float64 stack (axis 0: the updates) of that name's arrays."""
    out = {}
    for name, shape in layout:
        stack = np.stack([update[name] for update in updates], dtype=np.float64)
        out[name] = np.asarray(rule(stack), dtype=np.float64).reshape(shape)
    return Params(out, copy=False)  # fresh arrays of its own


def _matrix(updates: Sequence[Params], layout: _Layout) -> _Matrix:
    """The ``n x d`` float64 matrix whose row ``i`` is update ``i`` flattened."""
    sizes = [math.prod(shape) for _, shape in layout]
    matrix = np.empty((len(updates), sum(sizes)), dtype=np.float64)
    for row, update in zip(matrix, updates, strict=True):
        start = 0
        for (name, _), size in zip(layout, sizes, strict=True):
            row[start : start + size] = update[name].reshape(-1)
            start += size
    return matrix


def _unflatten(vector: _Matrix, layout: _Layout) -> Params:
    """``vector`` (a fresh 1-d float64 array nobody else holds) cut back into the arrays of ``layout``."""
    out = {}
    start = 0
    for name, shape in layout:
        size = math.prod(shape)
        out[name] = vector[start : start + size].reshape(shape)
        start += size
    return Params(out, copy=False)


def _krum_matrix(updates: Sequence[Params], f: int, m: int = 1) -> tuple[_Matrix, _Layout]:
    """Check Krum's arguments, then return the matrix of the updates and their layout."""
    if f < 0:
        raise ConfigError(f"Krum needs f >= 0, got f={f}")
    layout = _layout(updates)
    n = len(updates)
    if n <= 2 * f + 2:
        raise ConfigError(f"Krum with f={f} needs more than 2f+2 = {2 * f + 2} updates, got {n}")
    if not 1 <= m <= n:
        raise ConfigError(f"Krum needs 1 <= m <= n = {n}, got m={m}")
    return _matrix(updates, layout), layout


def _squared_distances(matrix: _Matrix) -> _Matrix:
    """The ``n x n`` squared L2 distances between the rows of ``matrix``, from exact differences; one row-sized
    scratch array on top of the matrix."""
    n = matrix.shape[0]
    distances = np.zeros((n, n), dtype=np.float64)
    scratch = np.empty(matrix.shape[1], dtype=np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            np.subtract(matrix[i], matrix[j], out=scratch)
            distances[i, j] = distances[j, i] = float(np.dot(scratch, scratch))
    return distances


def _scores(distances: _Matrix, f: int) -> npt.NDArray[np.float64]:
    return _closest_sums(distances, distances.shape[0] - f - 2)


def _closest_sums(distances: _Matrix, neighbours: int) -> npt.NDArray[np.float64]:
    """For each row, the sum of its ``neighbours`` smallest distances to the other rows (0 <= neighbours < n)."""
    others = distances.copy()
    np.fill_diagonal(others, np.inf)  # the distance to itself sorts last and is never among the neighbours
    sums: npt.NDArray[np.float64] = np.sort(others, axis=1)[:, :neighbours].sum(axis=1)
    return sums


def _select(scores: npt.NDArray[np.float64], m: int) -> list[int]:
    """The ``m`` lowest scores' indices, lowest first; a stable sort puts the lower index first on ties."""
    return [int(i) for i in np.argsort(scores, kind="stable")[:m]]
