"""Gossip maths: one mixing step and the consensus distance, with golden numbers worked out by hand in the
comments (the graphs and their mixing matrices are tested in tests/core/test_graphs.py)."""

import time

import numpy as np
import pytest

from fedloom.core import ConfigError, Params
from fedloom.core.graphs import fully_connected, mixing_matrix, ring
from fedloom.strategy.gossip import consensus_distance, gossip_step

# A path 0 - 1 - 2: degrees 1, 2, 1.
PATH = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=bool)


def model(w, counter) -> Params:
    """A float32 vector "w" of shape (2,) and an int64 batch-norm-like counter "n" of shape ()."""
    return Params({"w": np.array(w, dtype=np.float32), "n": np.array(counter, dtype=np.int64)})


# ----------------------------------------------------------------------------------------------- gossip_step


def test_gossip_step_golden_numbers_on_a_path():
    models = [model([3, 0], 1), model([0, 6], 2), model([6, 3], 4)]
    before = [Params(dict(m)) for m in models]
    mixed = gossip_step(models, mixing_matrix(PATH))
    # x0 = 2/3 [3, 0] + 1/3 [0, 6] = [2, 2]; x1 = ([3, 0] + [0, 6] + [6, 3]) / 3 = [3, 3];
    # x2 = 1/3 [0, 6] + 2/3 [6, 3] = [4, 4]. Counters: 2/3 + 2/3 = 4/3 -> 1; (1 + 2 + 4)/3 = 7/3 -> 2;
    # 2/3 + 8/3 = 10/3 -> 3 (rounded to the nearest integer).
    for out, w, counter in zip(mixed, [[2, 2], [3, 3], [4, 4]], [1, 2, 3], strict=True):
        assert list(out) == ["w", "n"]
        assert out["w"].dtype == np.float32
        assert out["n"].dtype == np.int64
        np.testing.assert_allclose(out["w"], w, rtol=1e-6)
        assert int(out["n"]) == counter
    assert models == before  # inputs untouched
    # Mixing keeps the mean ([3, 3]) and brings the models closer: the mean squared distance to it goes from
    # (9 + 18 + 9) / 3 = 12 to (2 + 0 + 2) / 3 = 4/3.
    assert consensus_distance(models) == pytest.approx(12.0)
    assert consensus_distance(mixed) == pytest.approx(4 / 3, rel=1e-6)


def test_repeated_gossip_on_a_ring_converges_to_the_exact_mean():
    rng = np.random.default_rng(0)
    models = [Params({"w": rng.normal(size=(3, 2)), "b": rng.normal(size=4)}) for _ in range(6)]
    mean = {name: np.mean([m[name] for m in models], axis=0) for name in ("w", "b")}
    W = mixing_matrix(ring(6))
    # The 6-ring's gap is 1 - (1/3 + 2/3 cos(pi/3)) = 1/3: 200 steps shrink the distance by (2/3)^200 ~ 1e-35.
    for _ in range(200):
        models = gossip_step(models, W)
        np.testing.assert_allclose(np.mean([m["w"] for m in models], axis=0), mean["w"], rtol=0, atol=1e-12)
    for m in models:
        np.testing.assert_allclose(m["w"], mean["w"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(m["b"], mean["b"], rtol=0, atol=1e-12)
    assert consensus_distance(models) < 1e-24


def test_gossip_step_on_a_full_graph_gives_everyone_the_same_model():
    models = [model([i, 2 * i], i) for i in range(7)]
    mixed = gossip_step(models, mixing_matrix(fully_connected(7)))
    assert all(m == mixed[0] for m in mixed)  # bit for bit
    np.testing.assert_allclose(mixed[0]["w"], [3, 6], rtol=1e-6)  # the mean of 0..6 is 3
    assert consensus_distance(mixed) == 0.0


def test_gossip_step_visits_only_neighbours():
    # 2,000 clients on a ring: 3 terms per client (6,000 additions) take milliseconds; a dense loop over all
    # 4,000,000 pairs would take seconds.
    n = 2000
    models = [Params({"w": np.full(4, float(i))}) for i in range(n)]
    W = mixing_matrix(ring(n))
    start = time.perf_counter()
    mixed = gossip_step(models, W)
    assert time.perf_counter() - start < 1.0
    # Client 0's neighbours are 1 and 1999: (0 + 1 + 1999) / 3.
    np.testing.assert_allclose(mixed[0]["w"], 2000 / 3)


def test_gossip_step_refuses_mismatched_input():
    W = mixing_matrix(PATH)
    with pytest.raises(ConfigError, match=r"for 2 models must be 2 x 2, got shape \(3, 3\)"):
        gossip_step([model([0, 0], 0)] * 2, W)
    with pytest.raises(ConfigError, match="model #2 does not match"):
        gossip_step([model([0, 0], 0), model([0, 0], 0), Params({"w": np.zeros(3)})], W)
    with pytest.raises(ConfigError, match="at least one model"):
        gossip_step([], W)
