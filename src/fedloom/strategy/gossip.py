"""Gossip averaging for decentralized FL: one mixing step and how far the models are from agreeing, as pure
functions.

In decentralized FL there is no server: each client keeps its own model and, after local training, replaces it
by a weighted average of its own and its neighbours' models, ``x_i <- sum_j W_ij x_j`` (D-PSGD: Lian et al.
2017, "Can Decentralized Algorithms Outperform Centralized Algorithms? A Case Study for Decentralized Parallel
Stochastic Gradient Descent"). ``W`` is the *mixing matrix* of a communication graph: ``W_ij > 0`` only where
``i`` and ``j`` are neighbours (or ``i == j``). The graphs (ring, random regular, fully connected), their
Metropolis-Hastings mixing matrices and spectral gaps are in :mod:`fedloom.core.graphs`; this module applies a
mixing matrix to models. Nothing here touches a transport or mutates its inputs; a mistake in the input raises
:class:`ConfigError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fedloom.core.errors import ConfigError
from fedloom.core.params import Params
from fedloom.strategy.aggregate import cast_like, f64

__all__ = ["consensus_distance", "gossip_step"]


def _check_models(models: Sequence[Params]) -> None:
    if not models:
        raise ConfigError("gossip needs at least one model")
    layout = [(name, array.shape) for name, array in models[0].items()]
    for k, model in enumerate(models[1:], start=1):
        if [(name, array.shape) for name, array in model.items()] != layout:
            raise ConfigError(f"model #{k} does not match model #0 in names or shapes")


def gossip_step(models: Sequence[Params], W: npt.ArrayLike) -> list[Params]:
    """One round of gossip: model ``i`` becomes ``sum_j W_ij models[j]``, name by name.

    Sums are taken in float64 and cast back to each array's dtype in ``models[i]``, integer arrays (batch-norm
    counters) rounded to the nearest integer. Only the non-zero entries of ``W`` are visited, so a sparse graph
    costs ``O(n * degree)`` model additions (``n`` the number of models), not ``O(n^2)``. ``models`` are not
    changed; while it mixes, the step holds a float64 copy of every model that is not float64 already.

    Raises :class:`ConfigError` when ``W`` is not ``n x n`` or not finite, or when the models differ in names or
    shapes.

    >>> from fedloom.core.graphs import mixing_matrix
    >>> path = mixing_matrix([[0, 1, 0], [1, 0, 1], [0, 1, 0]])
    >>> mixed = gossip_step([Params({"w": np.array([3.0])}), Params({"w": np.array([0.0])}),
    ...                      Params({"w": np.array([6.0])})], path)
    >>> [float(m["w"][0]) for m in mixed]  # 2/3*3 + 1/3*0, (3 + 0 + 6)/3, 1/3*0 + 2/3*6
    [2.0, 3.0, 4.0]
    """
    _check_models(models)
    matrix = np.asarray(W, dtype=np.float64)
    n = len(models)
    if matrix.shape != (n, n):
        raise ConfigError(f"a mixing matrix for {n} models must be {n} x {n}, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ConfigError("a mixing matrix must be finite")
    wide = [{name: f64(array) for name, array in model.items()} for model in models]
    rows, cols = np.nonzero(matrix)
    starts = np.searchsorted(rows, np.arange(n + 1))  # np.nonzero lists entries row by row
    mixed: list[Params] = []
    for i, model in enumerate(models):
        neighbours = cols[starts[i] : starts[i + 1]]
        totals: dict[str, Any] = {name: np.zeros(array.shape, np.float64) for name, array in model.items()}
        for j in neighbours:
            weight = matrix[i, j]
            for name, total in totals.items():
                total += weight * wide[j][name]
        mixed.append(cast_like(model, totals))
    return mixed


def consensus_distance(models: Sequence[Params]) -> float:
    """How far the models are from agreeing: the mean over models of ``||x_i - x_mean||^2``, each model taken
    as one vector of its floating-point arrays (integer ones are counters, not weights), in float64. 0 when
    every model is the same. Raises :class:`ConfigError` for no models or models that differ in names or shapes.

    >>> consensus_distance([Params({"w": np.array([0.0, 0.0])}), Params({"w": np.array([2.0, 2.0])})])
    2.0
    """
    _check_models(models)
    names = [name for name, array in models[0].items() if np.issubdtype(array.dtype, np.floating)]
    total = 0.0
    for name in names:
        # Offsets from the first model, whose mean is the offset of the mean: models that agree give exactly 0,
        # where a float mean of equal values can be off in the last bit.
        offsets = np.stack([f64(model[name]) - f64(models[0][name]) for model in models])
        total += float(np.sum(np.square(offsets - offsets.mean(axis=0))))
    return total / len(models)
