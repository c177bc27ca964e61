"""Gossip averaging for decentralized FL: topologies, mixing matrices and one mixing step, as pure functions.

In decentralized FL there is no server: each client keeps its own model and, after local training, replaces it
by a weighted average of its own and its neighbours' models, ``x_i <- sum_j W_ij x_j`` (D-PSGD: Lian et al.
2017, "Can Decentralized Algorithms Outperform Centralized Algorithms? A Case Study for Decentralized Parallel
Stochastic Gradient Descent"). ``W`` is the *mixing matrix* of a communication graph: ``W_ij > 0`` only where
``i`` and ``j`` are neighbours (or ``i == j``). Here ``W`` has Metropolis-Hastings weights (Xiao & Boyd 2004,
"Fast linear iterations for distributed averaging"), which need nothing but each node's and its neighbours'
degrees and make ``W`` symmetric and doubly stochastic; on a connected graph, repeated mixing then converges
to the exact average of the models, at a rate set by :func:`spectral_gap`.

A graph is an *adjacency matrix*: an ``n x n`` boolean array, symmetric, with an empty diagonal. Nothing here
touches a transport or mutates its inputs; a mistake in the input raises :class:`ConfigError`.

>>> W = mixing_matrix(ring(4))
>>> W[0]
array([0.33333333, 0.33333333, 0.        , 0.33333333])
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import numpy.typing as npt

from fedloom.core.errors import ConfigError
from fedloom.core.params import Params
from fedloom.strategy.aggregate import cast_like, f64

__all__ = [
    "TOPOLOGIES",
    "check_topology",
    "consensus_distance",
    "fully_connected",
    "gossip_step",
    "mixing_matrix",
    "random_regular",
    "ring",
    "spectral_gap",
    "topology",
]

Adjacency = npt.NDArray[np.bool_]
Matrix = npt.NDArray[np.float64]

# The names :func:`topology` takes, as ``fedloom simulate --topology`` does.
TOPOLOGIES = ("ring", "regular", "full")

# How many graphs :func:`random_regular` draws before it gives up on a connected one. For degree >= 3 almost
# every random regular graph is connected; degree 2 gives a union of cycles, which for larger n rarely is one.
_CONNECTED_TRIES = 100


def _check_count(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"a topology needs a whole number of clients >= 1, got {n!r}")


def ring(n: int) -> Adjacency:
    """Clients ``0..n-1`` on a cycle: ``i`` is a neighbour of ``i - 1`` and ``i + 1`` (mod ``n``). Every client
    has degree 2 (1 for ``n = 2``, 0 for ``n = 1``).

    >>> ring(4).astype(int)
    array([[0, 1, 0, 1],
           [1, 0, 1, 0],
           [0, 1, 0, 1],
           [1, 0, 1, 0]])
    """
    _check_count(n)
    adjacency = np.zeros((n, n), dtype=np.bool_)
    if n > 1:
        nodes = np.arange(n)
        adjacency[nodes, (nodes + 1) % n] = True
        adjacency[(nodes + 1) % n, nodes] = True
    return adjacency


def fully_connected(n: int) -> Adjacency:
    """Every client is a neighbour of every other (degree ``n - 1``): one mixing step is the exact average."""
    _check_count(n)
    adjacency = np.ones((n, n), dtype=np.bool_)
    np.fill_diagonal(adjacency, False)
    return adjacency


def random_regular(n: int, degree: int, rng: np.random.Generator) -> Adjacency:
    """A connected random ``degree``-regular graph over ``n`` clients, drawn by
    :func:`networkx.random_regular_graph` with a seed taken from ``rng`` (the same ``rng`` state gives the same
    graph). A disconnected draw is discarded and another one drawn, so gossip on the result can reach
    consensus.

    Raises :class:`ConfigError` unless ``1 <= degree < n`` and ``n * degree`` is even (a regular graph needs
    both), or when no connected graph turns up in 100 draws (``degree = 1`` with ``n > 2`` never gives one).
    """
    _check_count(n)
    if not isinstance(degree, int) or isinstance(degree, bool) or not 1 <= degree < n:
        raise ConfigError(f"a regular topology over {n} clients needs a whole degree in [1, {n - 1}], got {degree!r}")
    if n * degree % 2:
        raise ConfigError(
            f"no {degree}-regular graph over {n} clients exists: clients x degree must be even, got {n} x {degree}"
        )
    import networkx as nx  # here, not at the top: it adds a tenth of a second to every `import fedloom`

    for _ in range(_CONNECTED_TRIES):
        graph = nx.random_regular_graph(degree, n, seed=int(rng.integers(0, 2**31 - 1)))
        if nx.is_connected(graph):
            adjacency = np.zeros((n, n), dtype=np.bool_)
            edges = np.array(graph.edges, dtype=np.intp).reshape(-1, 2)
            adjacency[edges[:, 0], edges[:, 1]] = True
            adjacency[edges[:, 1], edges[:, 0]] = True
            return adjacency
    raise ConfigError(
        f"{_CONNECTED_TRIES} random {degree}-regular graphs over {n} clients were all disconnected; "
        "choose a larger degree"
    )


def topology(name: str, n: int, *, degree: int | None = None, rng: np.random.Generator) -> Adjacency:
    """The adjacency of topology ``name`` over ``n`` clients: ``ring``, ``regular`` (:func:`random_regular`,
    which needs ``degree``) or ``full``. ``degree`` applies to ``regular`` only. Raises :class:`ConfigError`
    for an unknown name (listing the choices) or a degree that does not fit."""
    check_topology(name, degree)
    if degree is not None:  # the regular topology, as checked
        return random_regular(n, degree, rng)
    return ring(n) if name == "ring" else fully_connected(n)


def check_topology(name: str, degree: int | None) -> None:
    """Raise :class:`ConfigError` unless ``name`` is one of :data:`TOPOLOGIES` and ``degree`` is given exactly
    when it is ``regular`` (what can be checked before the number of clients is known)."""
    if name not in TOPOLOGIES:
        raise ConfigError(f"unknown topology {name!r}; choose one of {', '.join(TOPOLOGIES)}")
    if name == "regular" and degree is None:
        raise ConfigError("the regular topology needs a degree (--degree)")
    if name != "regular" and degree is not None:
        raise ConfigError(f"a degree applies to the regular topology only, not to {name!r}")


def _check_adjacency(adjacency: npt.ArrayLike) -> Adjacency:
    array = np.asarray(adjacency)
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] < 1:
        raise ConfigError(f"an adjacency matrix must be square and non-empty, got shape {array.shape}")
    if array.dtype != np.bool_ and not np.isin(array, (0, 1)).all():
        raise ConfigError("an adjacency matrix must hold booleans (or 0 and 1)")
    graph = array.astype(np.bool_)
    if graph.diagonal().any():
        raise ConfigError("an adjacency matrix must have no self loops (its diagonal must be empty)")
    if not np.array_equal(graph, graph.T):
        raise ConfigError("an adjacency matrix must be symmetric: gossip links go both ways")
    import networkx as nx  # here, not at the top: see random_regular

    network = nx.Graph()
    network.add_nodes_from(range(len(graph)))
    network.add_edges_from(np.argwhere(np.triu(graph)).tolist())
    if not nx.is_connected(network):
        raise ConfigError("the graph is disconnected: gossip on it never reaches consensus")
    return graph


def mixing_matrix(adjacency: npt.ArrayLike) -> Matrix:
    """The Metropolis-Hastings mixing matrix of a graph (Xiao & Boyd 2004): for neighbours ``i`` and ``j``,
    ``W_ij = 1 / (1 + max(d_i, d_j))`` with ``d`` the degrees; ``W_ij = 0`` for other pairs; and
    ``W_ii = 1 - sum_{j != i} W_ij``. ``W`` is symmetric and doubly stochastic (rows and columns sum to 1),
    with non-negative entries, so mixing keeps the models' average.

    Raises :class:`ConfigError` unless ``adjacency`` is a square, symmetric boolean (or 0/1) matrix with an
    empty diagonal whose graph is connected.

    >>> mixing_matrix([[0, 1, 0], [1, 0, 1], [0, 1, 0]])  # a path 0 - 1 - 2: degrees 1, 2, 1
    array([[0.66666667, 0.33333333, 0.        ],
           [0.33333333, 0.33333333, 0.33333333],
           [0.        , 0.33333333, 0.66666667]])
    """
    graph = _check_adjacency(adjacency)
    degrees = graph.sum(axis=1)
    denominators = 1 + np.maximum.outer(degrees, degrees)
    W = np.where(graph, 1.0 / denominators, 0.0)
    for i in range(len(W)):
        # 1 - sum_j 1/(1 + max(d_i, d_j)) in exact fractions, then rounded once: a row whose weights are all
        # equal in exact arithmetic (a fully connected graph: 1/n each) is then equal in floats too, so every
        # client of such a graph sums the same terms in the same order and gets a bit-identical model.
        values, counts = np.unique(denominators[i][graph[i]], return_counts=True)
        W[i, i] = float(1 - sum(Fraction(int(c), int(v)) for v, c in zip(values, counts, strict=True)))
    return W


def spectral_gap(W: npt.ArrayLike) -> float:
    """``1 - |lambda_2|``, with ``|lambda_2|`` the second largest absolute eigenvalue of the symmetric mixing
    matrix ``W``: how fast gossip mixes. After ``t`` steps the models' distance to their average has shrunk by
    at least ``(1 - gap)^t``; 1 means one step reaches consensus (a fully connected graph), near 0 means slow
    mixing (a long ring: ``O(1/n^2)``). A single client has gap 1. A full eigendecomposition: ``O(n^3)``, about
    a second at 3,000 clients. Raises :class:`ConfigError` unless ``W`` is a square symmetric matrix."""
    matrix = np.asarray(W, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 1:
        raise ConfigError(f"a mixing matrix must be square and non-empty, got shape {matrix.shape}")
    if not np.allclose(matrix, matrix.T, rtol=0.0, atol=1e-12):
        raise ConfigError("the spectral gap needs a symmetric mixing matrix")
    if len(matrix) == 1:
        return 1.0
    magnitudes = np.sort(np.abs(np.linalg.eigvalsh(matrix)))
    return float(1.0 - magnitudes[-2])


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
