"""Communication graphs over numbered nodes (clients ``0..n-1``) and how fast averaging mixes over them, as pure
functions.

Two parts of fedloom draw graphs over their clients: decentralized FL averages each client's model with its
neighbours' (:mod:`fedloom.strategy.gossip`), and SecAgg+ lets each client deal only with its neighbours
(:func:`fedloom.privacy.secagg.neighbourhoods`). Both take their graphs from here.

A graph is an *adjacency matrix*: an ``n x n`` boolean array, symmetric, with an empty diagonal. The graphs are a
:func:`ring`, :func:`fully_connected`, and a connected :func:`random_regular` graph drawn from a seed; :func:`topology`
builds one by name (``ring``, ``regular``, ``full``). The *mixing matrix* ``W`` of a graph (:func:`mixing_matrix`)
has Metropolis-Hastings weights (Xiao & Boyd 2004, "Fast linear iterations for distributed averaging"), which need
nothing but each node's and its neighbours' degrees and make ``W`` symmetric and doubly stochastic; on a connected
graph, repeated averaging ``x <- W x`` converges to the exact average, at a rate set by :func:`spectral_gap`.

Nothing here mutates its inputs; a mistake in the input raises :class:`ConfigError`.

>>> W = mixing_matrix(ring(4))
>>> W[0]
array([0.33333333, 0.33333333, 0.        , 0.33333333])
>>> round(spectral_gap(W), 4)  # eigenvalues 1, 1/3, 1/3, -1/3
0.6667
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import numpy.typing as npt

from fedloom.core.errors import ConfigError

__all__ = [
    "TOPOLOGIES",
    "Adjacency",
    "check_topology",
    "fully_connected",
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
    """Nodes ``0..n-1`` on a cycle: ``i`` is a neighbour of ``i - 1`` and ``i + 1`` (mod ``n``). Every node has
    degree 2 (1 for ``n = 2``, 0 for ``n = 1``).

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
    """Every node is a neighbour of every other (degree ``n - 1``): one mixing step is the exact average."""
    _check_count(n)
    adjacency = np.ones((n, n), dtype=np.bool_)
    np.fill_diagonal(adjacency, False)
    return adjacency


def random_regular(n: int, degree: int, rng: np.random.Generator) -> Adjacency:
    """A connected random ``degree``-regular graph over ``n`` nodes, drawn by
    :func:`networkx.random_regular_graph` with a seed taken from ``rng`` (the same ``rng`` state gives the same
    graph). A disconnected draw is discarded and another one drawn, so averaging over the result can reach
    consensus (and no group of SecAgg+ parties is cut off from the rest).

    Raises :class:`ConfigError` unless ``1 <= degree < n`` and ``n * degree`` is even (a regular graph needs
    both), or when no connected graph turns up in 100 draws (``degree = 1`` with ``n > 2`` never gives one).
    """
    _check_regular(n, degree)
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


def _check_regular(n: int, degree: int) -> None:
    _check_count(n)
    if not isinstance(degree, int) or isinstance(degree, bool) or not 1 <= degree < n:
        raise ConfigError(f"a regular topology over {n} clients needs a whole degree in [1, {n - 1}], got {degree!r}")
    if n * degree % 2:
        raise ConfigError(
            f"no {degree}-regular graph over {n} clients exists: clients x degree must be even, got {n} x {degree}"
        )


def topology(name: str, n: int, *, degree: int | None = None, rng: np.random.Generator) -> Adjacency:
    """The adjacency of topology ``name`` over ``n`` nodes: ``ring``, ``regular`` (:func:`random_regular`, which
    needs ``degree``) or ``full``. ``degree`` applies to ``regular`` only. Raises :class:`ConfigError` for an
    unknown name (listing the choices) or a degree that does not fit."""
    check_topology(name, degree)
    if degree is not None:  # the regular topology, as checked
        return random_regular(n, degree, rng)
    return ring(n) if name == "ring" else fully_connected(n)


def check_topology(name: str, degree: int | None, n: int | None = None) -> None:
    """Raise :class:`ConfigError` unless ``name`` is one of :data:`TOPOLOGIES` and ``degree`` is given exactly
    when it is ``regular``; with the number of nodes ``n``, also unless a ``degree``-regular graph over ``n`` nodes
    exists (what :func:`topology` checks before it draws a graph)."""
    if name not in TOPOLOGIES:
        raise ConfigError(f"unknown topology {name!r}; choose one of {', '.join(TOPOLOGIES)}")
    if name == "regular" and degree is None:
        raise ConfigError("the regular topology needs a degree (--degree)")
    if name != "regular" and degree is not None:
        raise ConfigError(f"a degree applies to the regular topology only, not to {name!r}")
    if n is not None:
        _check_count(n)
        if degree is not None:
            _check_regular(n, degree)


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
    with non-negative entries, so averaging with it keeps the average.

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
        # node of such a graph sums the same terms in the same order and gets a bit-identical model.
        values, counts = np.unique(denominators[i][graph[i]], return_counts=True)
        W[i, i] = float(1 - sum(Fraction(int(c), int(v)) for v, c in zip(values, counts, strict=True)))
    return W


def spectral_gap(W: npt.ArrayLike) -> float:
    """``1 - |lambda_2|``, with ``|lambda_2|`` the second largest absolute eigenvalue of the symmetric mixing
    matrix ``W``: how fast averaging mixes. After ``t`` steps the values' distance to their average has shrunk by
    at least ``(1 - gap)^t``; 1 means one step reaches consensus (a fully connected graph), near 0 means slow
    mixing (a long ring: ``O(1/n^2)``). A single node has gap 1. A full eigendecomposition: ``O(n^3)``, about
    a second at 3,000 nodes. Raises :class:`ConfigError` unless ``W`` is a square symmetric matrix."""
    matrix = np.asarray(W, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 1:
        raise ConfigError(f"a mixing matrix must be square and non-empty, got shape {matrix.shape}")
    if not np.allclose(matrix, matrix.T, rtol=0.0, atol=1e-12):
        raise ConfigError("the spectral gap needs a symmetric mixing matrix")
    if len(matrix) == 1:
        return 1.0
    magnitudes = np.sort(np.abs(np.linalg.eigvalsh(matrix)))
    return float(1.0 - magnitudes[-2])
