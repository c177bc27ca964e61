"""Communication graphs: topologies, Metropolis-Hastings mixing weights and spectral gaps, with golden numbers
worked out by hand in the comments."""

import numpy as np
import pytest

from fedloom.core import ConfigError
from fedloom.core.graphs import (
    check_topology,
    fully_connected,
    mixing_matrix,
    random_regular,
    ring,
    spectral_gap,
    topology,
)
from fedloom.privacy.secagg import neighbourhoods

# A path 0 - 1 - 2: degrees 1, 2, 1.
PATH = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=bool)


def assert_graph(adjacency, degree) -> None:
    assert adjacency.dtype == np.bool_
    assert np.array_equal(adjacency, adjacency.T)
    assert not adjacency.diagonal().any()
    assert (adjacency.sum(axis=1) == degree).all()


# ------------------------------------------------------------------------------------------------ topologies


def test_ring_links_each_client_to_the_next_and_the_previous():
    adjacency = ring(5)
    assert adjacency.shape == (5, 5)
    assert_graph(adjacency, 2)
    assert [int(j) for j in np.flatnonzero(adjacency[0])] == [1, 4]
    assert [int(j) for j in np.flatnonzero(adjacency[3])] == [2, 4]
    assert_graph(ring(2), 1)  # the two neighbours of a client are the same one
    assert_graph(ring(1), 0)


def test_fully_connected_links_every_pair():
    adjacency = fully_connected(4)
    assert adjacency.shape == (4, 4)
    assert_graph(adjacency, 3)


def test_random_regular_has_the_degree_and_follows_the_generator():
    adjacency = random_regular(12, 3, np.random.default_rng(1))
    assert adjacency.shape == (12, 12)
    assert_graph(adjacency, 3)
    assert np.array_equal(adjacency, random_regular(12, 3, np.random.default_rng(1)))
    draws = [random_regular(12, 3, np.random.default_rng(seed)) for seed in range(2, 6)]
    assert any(not np.array_equal(adjacency, other) for other in draws)
    mixing_matrix(adjacency)  # connected, or this raises


@pytest.mark.parametrize(
    ("n", "degree", "words"),
    [
        (5, 3, "clients x degree must be even"),  # 5 * 3 = 15 edge ends cannot pair up
        (4, 4, "degree in [1, 3]"),  # a client has only 3 others
        (4, 0, "degree in [1, 3]"),
        (6, 1, "disconnected"),  # a perfect matching: 3 separate pairs, every time
    ],
)
def test_random_regular_refuses_degrees_that_cannot_work(n, degree, words):
    with pytest.raises(ConfigError, match=r".*") as error:
        random_regular(n, degree, np.random.default_rng(0))
    assert words in str(error.value)


def test_topology_by_name():
    rng = np.random.default_rng(0)
    assert np.array_equal(topology("ring", 6, rng=rng), ring(6))
    assert np.array_equal(topology("full", 6, rng=rng), fully_connected(6))
    assert_graph(topology("regular", 6, degree=4, rng=rng), 4)
    with pytest.raises(ConfigError, match="unknown topology 'star'; choose one of ring, regular, full"):
        topology("star", 6, rng=rng)
    with pytest.raises(ConfigError, match="needs a degree"):
        topology("regular", 6, rng=rng)
    with pytest.raises(ConfigError, match="regular topology only"):
        topology("ring", 6, degree=2, rng=rng)


# -------------------------------------------------------------------------------------------- mixing weights


def test_metropolis_hastings_weights_of_a_path():
    # W_01 = W_12 = 1 / (1 + max(1, 2)) = 1/3; the diagonal fills each row up to 1: 1 - 1/3 = 2/3 at the ends,
    # 1 - 2/3 = 1/3 in the middle; 0 and 2 are not neighbours.
    expected = np.array([[2, 1, 0], [1, 1, 1], [0, 1, 2]]) / 3
    np.testing.assert_allclose(mixing_matrix(PATH), expected, rtol=0, atol=1e-15)


def test_metropolis_hastings_weights_of_a_4_ring():
    # Every degree is 2: neighbours get 1 / (1 + 2) = 1/3, each client keeps 1 - 2/3 = 1/3, the client
    # opposite gets 0.
    expected = np.array([[1, 1, 0, 1], [1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 1, 1]]) / 3
    np.testing.assert_allclose(mixing_matrix(ring(4)), expected, rtol=0, atol=1e-15)


def test_metropolis_hastings_weights_of_a_star_use_the_larger_degree():
    # Centre 0 has degree 3, the leaves degree 1: each edge weighs 1 / (1 + max(3, 1)) = 1/4. The centre keeps
    # 1 - 3/4 = 1/4, each leaf 1 - 1/4 = 3/4.
    star = np.zeros((4, 4), dtype=bool)
    star[0, 1:] = star[1:, 0] = True
    expected = np.array([[1, 1, 1, 1], [1, 3, 0, 0], [1, 0, 3, 0], [1, 0, 0, 3]]) / 4
    np.testing.assert_allclose(mixing_matrix(star), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "adjacency",
    [ring(7), fully_connected(6), random_regular(20, 3, np.random.default_rng(3)), PATH],
    ids=["ring", "full", "regular", "path"],
)
def test_mixing_matrices_are_symmetric_and_doubly_stochastic(adjacency):
    W = mixing_matrix(adjacency)
    assert W.dtype == np.float64
    assert np.array_equal(W, W.T)
    assert (W >= 0).all()
    np.testing.assert_allclose(W.sum(axis=0), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert ((W > 0) == (adjacency | np.eye(len(W), dtype=bool))).all()  # only neighbours and oneself


def test_fully_connected_weights_are_exactly_equal():
    # 1/7 everywhere, the diagonal included, bit for bit: 1 - 6 * fl(1/7) would round elsewhere.
    assert np.unique(mixing_matrix(fully_connected(7))).tolist() == [1 / 7]


@pytest.mark.parametrize(
    ("adjacency", "words"),
    [
        (np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]), "disconnected"),  # 0-1 and 2-3
        (np.array([[1, 1], [1, 0]]), "no self loops"),
        (np.array([[0, 1, 1], [1, 0, 0], [0, 0, 0]]), "symmetric"),
        (np.zeros((2, 3), dtype=bool), "square"),
        (np.array([[0, 2], [2, 0]]), "booleans"),
    ],
    ids=["disconnected", "self_loop", "asymmetric", "not_square", "not_boolean"],
)
def test_mixing_matrix_refuses_bad_graphs(adjacency, words):
    with pytest.raises(ConfigError) as error:
        mixing_matrix(adjacency)
    assert words in str(error.value)


# ------------------------------------------------------------------------------------------------ spectral gap


def test_spectral_gap_of_full_ring_and_path():
    # Full: W = J / n has eigenvalues 1 and 0 (n - 1 times), so the gap is 1: one step reaches consensus.
    assert spectral_gap(mixing_matrix(fully_connected(5))) == pytest.approx(1.0, abs=1e-12)
    # A ring's W = I/3 + (shift + shift^-1)/3 has eigenvalues 1/3 + 2/3 cos(2 pi k / n). For n = 4:
    # 1, 1/3, -1/3, 1/3, so the gap is 1 - 1/3 = 2/3. For n = 12 the largest after 1 is
    # 1/3 + 2/3 cos(pi / 6) = 1/3 + sqrt(3)/3, a gap of 2/3 - sqrt(3)/3 ~= 0.0893: longer rings mix slower.
    assert spectral_gap(mixing_matrix(ring(4))) == pytest.approx(2 / 3, abs=1e-12)
    assert spectral_gap(mixing_matrix(ring(12))) == pytest.approx(2 / 3 - np.sqrt(3) / 3, abs=1e-12)
    # The path's W maps [1, 0, -1] to [2/3, 0, -2/3] (eigenvalue 2/3) and [1, -2, 1] to 0: the gap is 1/3.
    assert spectral_gap(mixing_matrix(PATH)) == pytest.approx(1 / 3, abs=1e-12)
    assert spectral_gap(np.ones((1, 1))) == 1.0


def test_a_3_regular_graph_on_6_nodes_by_hand():
    # Seed 0 draws the prism: triangles 0-4-5 and 1-2-3, joined by 0-3, 1-5 and 2-4. Pinned, so that moving the
    # construction (or a change in how a seed picks a graph) cannot silently rewire SecAgg+ or gossip runs.
    adjacency = random_regular(6, 3, np.random.default_rng(0))
    edges = np.argwhere(np.triu(adjacency)).tolist()
    assert edges == [[0, 3], [0, 4], [0, 5], [1, 2], [1, 3], [1, 5], [2, 3], [2, 4], [4, 5]]
    # Every degree is 3, so W = (I + A) / 4. The prism's A has eigenvalues 3, 1, 0, 0, -2, -2 (a triangle's 2, -1,
    # -1 plus or minus the rung's 1), so W has 1, 1/2, 1/4, 1/4, -1/4, -1/4: the gap is 1 - 1/2 = 1/2.
    W = mixing_matrix(adjacency)
    np.testing.assert_allclose(W, (np.eye(6) + adjacency) / 4, rtol=0, atol=1e-15)
    assert spectral_gap(W) == pytest.approx(0.5, abs=1e-12)


def test_secagg_neighbourhoods_are_the_random_regular_graph_over_the_parties():
    # SecAgg+ draws its neighbourhoods with the same construction: node i of the graph is the i-th party.
    parties = [11, 12, 13, 14, 15, 16]
    near = neighbourhoods(parties, 3, np.random.default_rng(0))
    # The prism above, relabelled: 0-3, 0-4, 0-5 become 11-14, 11-15, 11-16, and so on.
    assert near == {
        11: frozenset({14, 15, 16}),
        12: frozenset({13, 14, 16}),
        13: frozenset({12, 14, 15}),
        14: frozenset({11, 12, 13}),
        15: frozenset({11, 13, 16}),
        16: frozenset({11, 12, 15}),
    }
    for seed in range(1, 4):
        adjacency = random_regular(6, 3, np.random.default_rng(seed))
        expected = {p: frozenset(parties[j] for j in np.flatnonzero(adjacency[i])) for i, p in enumerate(parties)}
        assert neighbourhoods(parties, 3, np.random.default_rng(seed)) == expected


def test_check_topology_with_the_number_of_nodes_refuses_what_cannot_be_drawn():
    check_topology("regular", 3, 6)  # 6 x 3 = 18 edge ends: 9 edges
    check_topology("ring", None, 1)
    with pytest.raises(ConfigError, match="clients x degree must be even, got 5 x 3"):
        check_topology("regular", 3, 5)
    with pytest.raises(ConfigError, match=r"degree in \[1, 3\], got 4"):
        check_topology("regular", 4, 4)
    with pytest.raises(ConfigError, match="a whole number of clients >= 1, got 0"):
        check_topology("full", None, 0)
    with pytest.raises(ConfigError, match="needs a degree"):
        check_topology("regular", None, 6)
