"""Robust aggregation golden numbers, computed by hand on a few toy updates (see the comments)."""

import math
import re

import numpy as np
import pytest

from fedloom.core import ConfigError, Params
from fedloom.strategy.robust import (
    Bulyan,
    Krum,
    Mean,
    Median,
    TrimmedMean,
    bulyan,
    clip_to_norm,
    coordinate_median,
    krum,
    krum_scores,
    krum_select,
    l2_norm,
    trimmed_mean,
)


def p(w, b) -> Params:
    """A two-array update, float32 like a model's: "w" of shape (2,) and "b" of shape ()."""
    return Params({"w": np.array(w, dtype=np.float32), "b": np.array(b, dtype=np.float32)})


def one(x) -> Params:
    """A one-dimensional update."""
    return Params({"x": np.array([x], dtype=np.float64)})


def assert_params(out: Params, w, b) -> None:
    assert list(out) == ["w", "b"]
    assert out["w"].shape == (2,)
    assert out["b"].shape == ()
    assert out["w"].dtype == np.float64
    assert out["b"].dtype == np.float64
    np.testing.assert_allclose(out["w"], w, rtol=1e-12)
    np.testing.assert_allclose(out["b"], b, rtol=1e-12)


# Five updates for the coordinate-wise rules; the columns, by hand:
#   w[0]: 1, 2, 100, 3, -6  -> sorted [-6, 1, 2, 3, 100]
#   w[1]: 10, -5, 0, 1, 2   -> sorted [-5, 0, 1, 2, 10]
#   b:    -1, 0, 7, 3, 3    -> sorted [-1, 0, 3, 3, 7]
FIVE = [p([1, 10], -1), p([2, -5], 0), p([100, 0], 7), p([3, 1], 3), p([-6, 2], 3)]

# Five updates for Krum: four at the corners of a unit simplex around the origin, one far away.
# Squared distances: u0 to u1, u2, u3: 1 each; between u1, u2, u3: 1 + 1 = 2 each;
# u4 to u0: 81 * 3 = 243; u4 to u1 (and u2, u3): 8^2 + 9^2 + 9^2 = 64 + 81 + 81 = 226.
SIMPLEX = [p([0, 0], 0), p([1, 0], 0), p([0, 1], 0), p([0, 0], 1), p([9, 9], 9)]


def test_l2_norm_and_clip_on_a_3_4_5_triangle():
    # sqrt(3^2 + 4^2) = 5 over all arrays; scaled by 1/5: [3, 4] / 5 = [0.6, 0.8].
    assert l2_norm(p([3, 0], 4)) == pytest.approx(5.0)
    np.testing.assert_allclose(clip_to_norm(Params({"w": np.array([3.0, 4.0])}), 1.0)["w"], [0.6, 0.8])
    # The same across two arrays: w = [3, 0] / 5 = [0.6, 0], b = 4 / 5 = 0.8; the norm is then 1.
    clipped = clip_to_norm(p([3, 0], 4), 1.0)
    assert_params(clipped, [0.6, 0.0], 0.8)
    assert l2_norm(clipped) == pytest.approx(1.0)


def test_clip_leaves_an_update_inside_the_bound_unchanged():
    # norm 5 <= 5 and <= 10: scale min(1, 10 / 5) = 1.
    assert_params(clip_to_norm(p([3, 0], 4), 10.0), [3.0, 0.0], 4.0)
    assert_params(clip_to_norm(p([3, 0], 4), 5.0), [3.0, 0.0], 4.0)
    # A zero update has norm 0 and stays zero (no division by zero).
    assert_params(clip_to_norm(p([0, 0], 0), 1.0), [0.0, 0.0], 0.0)


def test_coordinate_median_odd_and_even():
    # Odd n = 5: the middle of each sorted column: w = [2, 1], b = 3.
    assert_params(coordinate_median(FIVE), [2.0, 1.0], 3.0)
    # Even n = 4 (FIVE without u4): mean of the two middle values.
    #   w[0] sorted [1, 2, 3, 100] -> (2 + 3) / 2 = 2.5; w[1] sorted [-5, 0, 1, 10] -> (0 + 1) / 2 = 0.5;
    #   b sorted [-1, 0, 3, 7] -> (0 + 3) / 2 = 1.5.
    assert_params(coordinate_median(FIVE[:4]), [2.5, 0.5], 1.5)


def test_trimmed_mean_drops_k_each_side():
    # beta = 0.2, n = 5: k = floor(1.0) = 1, drop the smallest and the largest, average 3:
    #   w[0]: mean(1, 2, 3) = 2; w[1]: mean(0, 1, 2) = 1; b: mean(0, 3, 3) = 2.
    assert_params(trimmed_mean(FIVE, 0.2), [2.0, 1.0], 2.0)
    # beta = 0.1: k = floor(0.5) = 0, the plain mean:
    #   w[0]: (1 + 2 + 100 + 3 - 6) / 5 = 20; w[1]: (10 - 5 + 0 + 1 + 2) / 5 = 1.6; b: (-1 + 0 + 7 + 3 + 3) / 5 = 2.4.
    assert_params(trimmed_mean(FIVE, 0.1), [20.0, 1.6], 2.4)
    # A four-value example: sorted [-1, 0, 2, 100], beta = 0.25 -> k = 1 -> mean(0, 2) = 1.
    np.testing.assert_allclose(trimmed_mean([one(100), one(0), one(-1), one(2)], 0.25)["x"], [1.0])


def test_krum_scores_by_hand_five_updates():
    # n = 5, f = 1: each score sums the n - f - 2 = 2 smallest squared distances to the others.
    #   0: to 1, 2, 3, 100: 1, 4, 9, 10000     -> 1 + 4 = 5
    #   1: to 0, 2, 3, 100: 1, 1, 4, 9801      -> 1 + 1 = 2
    #   2: to 0, 1, 3, 100: 4, 1, 1, 9604      -> 1 + 1 = 2
    #   3: to 0, 1, 2, 100: 9, 4, 1, 9409      -> 1 + 4 = 5
    #   100: to 0, 1, 2, 3: 10000, 9801, 9604, 9409 -> 9409 + 9604 = 19013
    updates = [one(0), one(1), one(2), one(3), one(100)]
    scores = krum_scores(updates, f=1)
    assert scores.dtype == np.float64
    np.testing.assert_array_equal(scores, [5.0, 2.0, 2.0, 5.0, 19013.0])
    # Ties go to the lower index: 1 before 2 (score 2), 0 before 3 (score 5).
    assert krum_select(updates, f=1) == [1]
    assert krum_select(updates, f=1, m=3) == [1, 2, 0]
    assert krum_select(updates, f=1, m=5) == [1, 2, 0, 3, 4]
    np.testing.assert_array_equal(krum(updates, f=1)["x"], [1.0])
    # Multi-Krum, m = 4: mean(1, 2, 0, 3) = 1.5.
    np.testing.assert_array_equal(krum(updates, f=1, m=4)["x"], [1.5])


def test_krum_scores_by_hand_six_updates():
    # n = 6, f = 1: the n - f - 2 = 3 smallest squared distances to the others.
    #   -2: to 0, 1, 3, 7, 50: 4, 9, 25, 81, 2704       -> 4 + 9 + 25 = 38
    #    0: to -2, 1, 3, 7, 50: 4, 1, 9, 49, 2500       -> 1 + 4 + 9 = 14
    #    1: to -2, 0, 3, 7, 50: 9, 1, 4, 36, 2401       -> 1 + 4 + 9 = 14
    #    3: to -2, 0, 1, 7, 50: 25, 9, 4, 16, 2209      -> 4 + 9 + 16 = 29
    #    7: to -2, 0, 1, 3, 50: 81, 49, 36, 16, 1849    -> 16 + 36 + 49 = 101
    #   50: to -2, 0, 1, 3, 7: 2704, 2500, 2401, 2209, 1849 -> 1849 + 2209 + 2401 = 6459
    updates = [one(x) for x in (-2, 0, 1, 3, 7, 50)]
    np.testing.assert_array_equal(krum_scores(updates, f=1), [38.0, 14.0, 14.0, 29.0, 101.0, 6459.0])
    # Multi-Krum, m = 3: indices 1, 2 (score 14), 3 (29) -> mean(0, 1, 3) = 4 / 3.
    assert krum_select(updates, f=1, m=3) == [1, 2, 3]
    np.testing.assert_allclose(krum(updates, f=1, m=3)["x"], [4 / 3])


def test_krum_and_multi_krum_on_two_arrays():
    # n = 5, f = 1, 2 neighbours, distances in the comment on SIMPLEX:
    #   u0: 1 + 1 = 2; u1, u2, u3: 1 + 2 = 3; u4: 226 + 226 = 452.
    np.testing.assert_array_equal(krum_scores(SIMPLEX, f=1), [2.0, 3.0, 3.0, 3.0, 452.0])
    # Krum: u0 itself.
    assert_params(krum(SIMPLEX, f=1), [0.0, 0.0], 0.0)
    # Multi-Krum, m = 4: mean(u0, u1, u2, u3) = ([0,0] + [1,0] + [0,1] + [0,0]) / 4 = [0.25, 0.25], b = 1/4.
    assert krum_select(SIMPLEX, f=1, m=4) == [0, 1, 2, 3]
    assert_params(krum(SIMPLEX, f=1, m=4), [0.25, 0.25], 0.25)


def test_bulyan_seven_updates_one_byzantine():
    # u_i = (w = [x, 2x], b = 7 - x) for x in [0, 1, 3, 5, 10, 16, 1000]: every squared distance is
    # (1 + 4 + 1) = 6 times the one between the x's, so Krum picks as on the x's alone.
    # n = 7, f = 1: theta = n - 2f = 5 picks, then beta = theta - 2f = 3 values per coordinate.
    # Squared distances of the x's:
    #   0-1: 1, 0-3: 9, 0-5: 25, 0-10: 100, 0-16: 256, 1-3: 4, 1-5: 16, 1-10: 81, 1-16: 225,
    #   3-5: 4, 3-10: 49, 3-16: 169, 5-10: 25, 5-16: 121, 10-16: 36; 1000 is ~1e6 from all.
    # Pick 1, all 7, 4 neighbours: 0: 1+9+25+100 = 135; 1: 1+4+16+81 = 102; 3: 4+4+9+49 = 66;
    #   5: 4+16+25+25 = 70; 10: 25+36+49+81 = 191; 16: 36+121+169+225 = 551  -> x = 3.
    # Pick 2, {0, 1, 5, 10, 16, 1000}, 3 neighbours: 0: 1+25+100 = 126; 1: 1+16+81 = 98;
    #   5: 16+25+25 = 66; 10: 25+36+81 = 142; 16: 36+121+225 = 382  -> x = 5.
    # Pick 3, {0, 1, 10, 16, 1000}, 2 neighbours: 0: 1+100 = 101; 1: 1+81 = 82; 10: 36+81 = 117;
    #   16: 36+225 = 261  -> x = 1.
    # Pick 4, {0, 10, 16, 1000}, 1 neighbour: 0: 100; 10: 36; 16: 36  -> tie, lower index: x = 10.
    # Pick 5, {0, 16, 1000}, still 1 neighbour: 0: 256; 16: 256  -> tie, lower index: x = 0.
    # Selected x: [3, 5, 1, 10, 0], median 3; |x - 3| = 0, 2, 2, 7, 3 -> closest 3: 3, 5, 1 -> mean 3.
    # So w = [3, 2 * 3] = [3, 6] and b = mean(7-3, 7-5, 7-1) = mean(4, 2, 6) = 4.
    updates = [p([x, 2 * x], 7 - x) for x in (0, 1, 3, 5, 10, 16, 1000)]
    assert_params(bulyan(updates, f=1), [3.0, 6.0], 4.0)
    # The plain mean is dragged by x = 1000: (0 + 1 + 3 + 5 + 10 + 16 + 1000) / 7 = 1035 / 7.
    assert Mean()(updates, [1] * 7)["w"][0] == pytest.approx(1035 / 7)


def test_bulyan_coordinate_step_ties_go_to_the_earlier_pick():
    # x = [0, 1, 3, 6, 10, 16, 1000], f = 1. Squared distances: 0-1: 1, 0-3: 9, 0-6: 36, 0-10: 100, 0-16: 256,
    #   1-3: 4, 1-6: 25, 1-10: 81, 1-16: 225, 3-6: 9, 3-10: 49, 3-16: 169, 6-10: 16, 6-16: 100, 10-16: 36.
    # Pick 1 (4 neighbours): 0: 146; 1: 111; 3: 4+9+9+49 = 71; 6: 9+16+25+36 = 86; 10: 182; 16: 530 -> 3.
    # Pick 2 (3): 0: 1+36+100 = 137; 1: 1+25+81 = 107; 6: 16+25+36 = 77; 10: 16+36+81 = 133; 16: 361 -> 6.
    # Pick 3 (2): 0: 101; 1: 82; 10: 117; 16: 261 -> 1.  Pick 4 (1): 0: 100; 10: 36; 16: 36 -> 10.
    # Pick 5 (1): 0: 256; 16: 256 -> 0.
    # Selected [3, 6, 1, 10, 0], median 3, |x - 3| = 0, 3, 2, 7, 3: 3 and 1, then 6 and 0 tie at 3 and 6 was
    # picked first -> mean(3, 1, 6) = 10 / 3 (it would be mean(3, 1, 0) = 4 / 3 if ties went to the lower index).
    updates = [one(x) for x in (0, 1, 3, 6, 10, 16, 1000)]
    np.testing.assert_allclose(bulyan(updates, f=1)["x"], [10 / 3])


def test_bulyan_with_no_byzantine_clients_is_the_mean():
    # f = 0, n = 3: theta = 3, beta = 3, so every value is kept: mean(0, 1, 5) = 2.
    np.testing.assert_allclose(bulyan([one(0), one(1), one(5)], f=0)["x"], [2.0])


def test_mean_is_weighted_and_float64():
    # w = 1/4 * [1, 2] + 3/4 * [5, 6] = [4, 5]; b = 1/4 * 0 + 3/4 * 4 = 3.
    assert_params(Mean()([p([1, 2], 0), p([5, 6], 4)], [1, 3]), [4.0, 5.0], 3.0)
    # A zero weight leaves an update out: [1, 2] and 0 with weights 2 and 0.
    assert_params(Mean()([p([1, 2], 0), p([5, 6], 4)], [2, 0]), [1.0, 2.0], 0.0)


def test_robust_aggregators_match_their_functions_and_ignore_weights():
    # Weights a Byzantine client could claim (huge, zero, negative, NaN) change nothing.
    lies = [1e9, 0.0, -5.0, math.nan, 1.0]
    assert Median()(FIVE, lies) == coordinate_median(FIVE)
    assert TrimmedMean(beta=0.2)(FIVE, lies) == trimmed_mean(FIVE, 0.2)
    assert TrimmedMean()(FIVE, lies) == trimmed_mean(FIVE, 0.1)
    assert Krum()(SIMPLEX, lies) == krum(SIMPLEX, f=1)
    assert Krum(f=1, m=4)(SIMPLEX, lies) == krum(SIMPLEX, f=1, m=4)
    seven = [*FIVE, p([0, 0], 0), p([1, 1], 1)]
    assert Bulyan()(seven, [*lies, 1.0, 1.0]) == bulyan(seven, f=1)


def test_one_byzantine_update_moves_the_mean_but_not_the_robust_rules():
    # Six honest updates in [1, 1.5] x [-1.5, -1] x [0.5, 1], one Byzantine update of 1e6 everywhere.
    honest = [p([1 + i / 10, -1 - i / 10], 0.5 + i / 10) for i in range(6)]
    updates = [*honest[:3], p([1e6, 1e6], 1e6), *honest[3:]]
    weights = [1.0] * 7
    low = {name: np.min([u[name] for u in honest], axis=0) for name in ("w", "b")}
    high = {name: np.max([u[name] for u in honest], axis=0) for name in ("w", "b")}
    for aggregate in (Median(), TrimmedMean(beta=0.2), Krum(f=1), Krum(f=1, m=3), Bulyan(f=1)):
        out = aggregate(updates, weights)
        for name in ("w", "b"):
            assert np.all(low[name] - 1e-6 <= out[name]), aggregate
            assert np.all(out[name] <= high[name] + 1e-6), aggregate
    assert np.all(Mean()(updates, weights)["w"] > 1e5)  # ~1e6 / 7


def test_inputs_are_not_mutated_and_layout_follows_the_first_update():
    arrays = [{"w": np.array([1.0, 2.0], np.float32), "b": np.array(3.0, np.float32)} for _ in range(7)]
    for i, a in enumerate(arrays):
        a["w"] += i
    updates = [Params(a, copy=False) for a in arrays]
    before = [{name: a[name].copy() for name in a} for a in arrays]
    outputs = [
        clip_to_norm(updates[0], 0.5),
        coordinate_median(updates),
        trimmed_mean(updates, 0.2),
        krum(updates, 1, 3),
        bulyan(updates, 1),
        Mean()(updates, [1.0] * 7),
    ]
    krum_scores(updates, 1)
    krum_select(updates, 1, 2)
    for a, b in zip(arrays, before, strict=True):
        np.testing.assert_array_equal(a["w"], b["w"])
        np.testing.assert_array_equal(a["b"], b["b"])
        assert a["w"].dtype == np.float32
    for out in outputs:
        assert list(out) == ["w", "b"]
        assert [out[n].shape for n in out] == [(2,), ()]
        assert all(out[n].dtype == np.float64 for n in out)
    # Another order of names is kept as given.
    flipped = [Params({"b": np.array(float(i)), "w": np.array([i, -i], np.float32)}) for i in range(3)]
    assert list(coordinate_median(flipped)) == ["b", "w"]


@pytest.mark.parametrize(
    "call",
    [
        coordinate_median,
        lambda u: trimmed_mean(u, 0.1),
        lambda u: krum_scores(u, 0),
        lambda u: krum_select(u, 0),
        lambda u: krum(u, 0),
        lambda u: bulyan(u, 0),
        lambda u: Mean()(u, []),
        lambda u: Median()(u, []),
    ],
)
def test_empty_list_is_refused(call):
    with pytest.raises(ConfigError, match="cannot aggregate an empty list of updates"):
        call([])


def test_updates_that_differ_in_names_or_shapes_are_refused():
    base = p([0, 0], 0)
    with pytest.raises(ConfigError, match="update #1 has parameter 'c' at position 1 where update #0 has 'b'"):
        coordinate_median([base, Params({"w": np.zeros(2), "c": np.zeros(())})])
    with pytest.raises(ConfigError, match="update #2 lacks parameter 'b' of update #0"):
        trimmed_mean([base, base, Params({"w": np.zeros(2)})], 0.1)
    with pytest.raises(ConfigError, match="update #1 has parameter 'z' that update #0 lacks"):
        Mean()([base, Params({"w": np.zeros(2), "b": np.zeros(()), "z": np.zeros(1)})], [1, 1])
    with pytest.raises(ConfigError, match="update #1 has parameter 'b' at position 0 where update #0 has 'w'"):
        krum([base, Params({"b": np.zeros(()), "w": np.zeros(2)}), base, base], 0)
    with pytest.raises(ConfigError, match=re.escape("update #3 has 'w' of shape (3,), update #0 has (2,)")):
        bulyan([base, base, base, Params({"w": np.zeros(3), "b": np.zeros(())})], 0)


def test_krum_arguments_out_of_range():
    six = [one(x) for x in range(6)]
    with pytest.raises(ConfigError, match=re.escape("Krum with f=3 needs more than 2f+2 = 8 updates, got 6")):
        krum(six, 3)
    with pytest.raises(ConfigError, match=re.escape("Krum with f=2 needs more than 2f+2 = 6 updates, got 6")):
        krum_scores(six, 2)
    with pytest.raises(ConfigError, match=re.escape("Krum needs f >= 0, got f=-1")):
        krum_select(six, -1)
    with pytest.raises(ConfigError, match=re.escape("Krum needs 1 <= m <= n = 6, got m=0")):
        krum_select(six, 1, m=0)
    with pytest.raises(ConfigError, match=re.escape("Krum needs 1 <= m <= n = 6, got m=7")):
        krum(six, 1, m=7)


def test_bulyan_arguments_out_of_range():
    six = [one(x) for x in range(6)]
    with pytest.raises(ConfigError, match=re.escape("Bulyan with f=1 needs at least 4f+3 = 7 updates, got 6")):
        bulyan(six, 1)
    with pytest.raises(ConfigError, match=re.escape("Bulyan needs f >= 0, got f=-1")):
        bulyan(six, -1)


@pytest.mark.parametrize("beta", [0.5, 0.7, -0.1, math.nan])
def test_trimmed_mean_beta_out_of_range(beta):
    with pytest.raises(ConfigError, match=re.escape("trimmed mean needs 0 <= beta < 0.5")):
        trimmed_mean(FIVE, beta)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, math.nan])
def test_clip_max_norm_out_of_range(max_norm):
    with pytest.raises(ConfigError, match=re.escape("clip_to_norm needs max_norm > 0")):
        clip_to_norm(p([3, 0], 4), max_norm)


def test_mean_weights_are_checked():
    two = [p([1, 2], 0), p([5, 6], 4)]
    with pytest.raises(ConfigError, match="got 2 updates but 1 weights"):
        Mean()(two, [1.0])
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match="weights must be finite and non-negative"):
            Mean()(two, [1.0, bad])
    with pytest.raises(ConfigError, match=re.escape("weights must sum to > 0")):
        Mean()(two, [0, 0])
    with pytest.raises(ConfigError, match="got 2 updates but 3 weights"):
        Median()(two, [1, 1, 1])


def test_aggregator_arguments_are_checked_on_construction():
    with pytest.raises(ConfigError, match=re.escape("trimmed mean needs 0 <= beta < 0.5, got beta=0.5")):
        TrimmedMean(beta=0.5)
    with pytest.raises(ConfigError, match=re.escape("Krum needs f >= 0, got f=-1")):
        Krum(f=-1)
    with pytest.raises(ConfigError, match=re.escape("Krum needs m >= 1, got m=0")):
        Krum(m=0)
    with pytest.raises(ConfigError, match=re.escape("Bulyan needs f >= 0, got f=-1")):
        Bulyan(f=-1)
