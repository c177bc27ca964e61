"""Partitioners: every sample exactly once, no empty client, reproducible, and the skew each one promises."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.core.config import PartitionConfig
from fedloom.core.errors import ConfigError
from fedloom.data.partition import (
    dirichlet,
    iid,
    label_histogram,
    natural,
    partition,
    quantity_skew,
    shards,
)

Parts = list[npt.NDArray[np.int64]]

SETTINGS = settings(max_examples=50, deadline=None)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def assert_valid(parts: Parts, num_samples: int, num_clients: int) -> None:
    """The contract every partitioner keeps."""
    assert len(parts) == num_clients
    for part in parts:
        assert part.dtype == np.int64
        assert part.ndim == 1
        assert len(part) >= 1
        assert np.all(np.diff(part) > 0), "each part is sorted ascending without repeats"
    everything = np.concatenate(parts)
    assert len(everything) == num_samples
    assert np.array_equal(np.sort(everything), np.arange(num_samples))


def assert_same(a: Parts, b: Parts) -> None:
    assert len(a) == len(b)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def differ(a: Parts, b: Parts) -> bool:
    return len(a) != len(b) or any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def assert_histogram(parts: Parts, labels: npt.NDArray[np.int64], num_classes: int) -> None:
    histogram = label_histogram(parts, labels, num_classes)
    assert histogram.dtype == np.int64
    assert histogram.shape == (len(parts), num_classes)
    assert np.array_equal(histogram.sum(axis=0), np.bincount(labels, minlength=num_classes))
    assert np.array_equal(histogram.sum(axis=1), [len(p) for p in parts])


@st.composite
def labelled(draw: st.DrawFn, min_per_client: int = 1) -> tuple[npt.NDArray[np.int64], int, int]:
    """(labels, num_classes, num_clients) with at least ``min_per_client`` samples per client."""
    num_classes = draw(st.integers(1, 10))
    num_clients = draw(st.integers(1, 12))
    size = draw(st.integers(num_clients * min_per_client, num_clients * min_per_client + 200))
    labels = draw(st.lists(st.integers(0, num_classes - 1), min_size=size, max_size=size))
    return np.array(labels, dtype=np.int64), num_classes, num_clients


seeds = st.integers(0, 2**32 - 1)


# -- properties, one block per partitioner ------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), seed=seeds)
def test_iid_properties(data: st.DataObject, seed: int) -> None:
    num_clients = data.draw(st.integers(1, 40))
    num_samples = data.draw(st.integers(num_clients, 500))
    parts = iid(num_samples, num_clients, rng(seed))
    assert_valid(parts, num_samples, num_clients)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert_same(parts, iid(num_samples, num_clients, rng(seed)))
    labels = np.arange(num_samples, dtype=np.int64) % 3
    assert_histogram(parts, labels, 3)


@SETTINGS
@given(case=labelled(min_per_client=30), alpha=st.floats(0.5, 10.0), seed=seeds)
def test_dirichlet_properties(case: tuple[npt.NDArray[np.int64], int, int], alpha: float, seed: int) -> None:
    labels, num_classes, num_clients = case
    parts = dirichlet(labels, num_clients, alpha, rng(seed))
    assert_valid(parts, len(labels), num_clients)
    assert_same(parts, dirichlet(labels, num_clients, alpha, rng(seed)))
    assert_histogram(parts, labels, num_classes)


@SETTINGS
@given(case=labelled(min_per_client=30), min_size=st.integers(1, 10), seed=seeds)
def test_dirichlet_min_size(case: tuple[npt.NDArray[np.int64], int, int], min_size: int, seed: int) -> None:
    labels, _, num_clients = case
    parts = dirichlet(labels, num_clients, 2.0, rng(seed), min_size=min_size)
    assert min(len(p) for p in parts) >= min_size


@SETTINGS
@given(case=labelled(min_per_client=4), shards_per_client=st.integers(1, 4), seed=seeds)
def test_shards_properties(case: tuple[npt.NDArray[np.int64], int, int], shards_per_client: int, seed: int) -> None:
    labels, num_classes, num_clients = case
    parts = shards(labels, num_clients, shards_per_client, rng(seed))
    assert_valid(parts, len(labels), num_clients)
    sizes = [len(p) for p in parts]
    shard_size = len(labels) / (num_clients * shards_per_client)
    # Every shard has floor or ceil of the mean shard size, so clients differ by at most spc samples.
    assert max(sizes) - min(sizes) <= shards_per_client
    assert min(sizes) >= shards_per_client * np.floor(shard_size)
    assert_same(parts, shards(labels, num_clients, shards_per_client, rng(seed)))
    assert_histogram(parts, labels, num_classes)


@SETTINGS
@given(data=st.data(), alpha=st.floats(0.05, 100.0), seed=seeds)
def test_quantity_skew_properties(data: st.DataObject, alpha: float, seed: int) -> None:
    num_clients = data.draw(st.integers(1, 40))
    min_size = data.draw(st.integers(1, 5))
    num_samples = data.draw(st.integers(num_clients * min_size, 600))
    parts = quantity_skew(num_samples, num_clients, alpha, rng(seed), min_size=min_size)
    assert_valid(parts, num_samples, num_clients)
    assert min(len(p) for p in parts) >= min_size
    assert_same(parts, quantity_skew(num_samples, num_clients, alpha, rng(seed), min_size=min_size))
    labels = np.arange(num_samples, dtype=np.int64) % 4
    assert_histogram(parts, labels, 4)


@SETTINGS
@given(groups=st.lists(st.integers(0, 30), min_size=1, max_size=300))
def test_natural_properties(groups: list[int]) -> None:
    parts = natural(groups)
    present = sorted(set(groups))
    assert_valid(parts, len(groups), len(present))
    array = np.array(groups)
    for group, part in zip(present, parts, strict=True):
        assert np.array_equal(part, np.flatnonzero(array == group))
    assert_same(parts, natural(groups))


@SETTINGS
@given(case=labelled(min_per_client=30), seed=seeds)
def test_partition_dispatches_to_each_scheme(case: tuple[npt.NDArray[np.int64], int, int], seed: int) -> None:
    labels, num_classes, num_clients = case
    assert_same(
        partition(labels, num_clients, PartitionConfig("iid"), rng(seed)), iid(len(labels), num_clients, rng(seed))
    )
    assert_same(
        partition(labels, num_clients, PartitionConfig("dirichlet", alpha=0.7), rng(seed)),
        dirichlet(labels, num_clients, 0.7, rng(seed)),
    )
    assert_same(
        partition(labels, num_clients, PartitionConfig("shards", shards_per_client=3), rng(seed)),
        shards(labels, num_clients, 3, rng(seed)),
    )
    assert_same(
        partition(labels, num_clients, PartitionConfig("quantity", alpha=0.7), rng(seed)),
        quantity_skew(len(labels), num_clients, 0.7, rng(seed)),
    )
    groups = np.arange(len(labels)) % num_clients
    parts = partition(labels, num_clients, PartitionConfig("natural"), rng(seed), groups=groups)
    assert_same(parts, natural(groups))
    assert_histogram(parts, labels, num_classes)


# -- different seeds give different partitions ---------------------------------------------------------------

BALANCED = np.repeat(np.arange(10, dtype=np.int64), 30)  # 300 samples, 10 classes

SEEDED: dict[str, Callable[[np.random.Generator], Parts]] = {
    "iid": lambda g: iid(300, 10, g),
    "dirichlet": lambda g: dirichlet(BALANCED, 10, 0.5, g),
    "shards": lambda g: shards(BALANCED, 10, 2, g),
    "quantity": lambda g: quantity_skew(300, 10, 0.5, g),
}


@pytest.mark.parametrize("name", sorted(SEEDED))
@pytest.mark.parametrize(("seed_a", "seed_b"), [(0, 1), (1, 2), (123, 4567)])
def test_different_seeds_give_different_parts(name: str, seed_a: int, seed_b: int) -> None:
    split = SEEDED[name]
    assert differ(split(rng(seed_a)), split(rng(seed_b)))


def test_partitioners_do_not_touch_the_global_rng() -> None:
    np.random.seed(7)
    before = np.random.random()
    np.random.seed(7)
    for split in SEEDED.values():
        split(rng(3))
    assert np.random.random() == before


# -- the skew each scheme promises ---------------------------------------------------------------------------


def mean_label_entropy(parts: Parts, labels: npt.NDArray[np.int64], num_classes: int) -> float:
    histogram = label_histogram(parts, labels, num_classes).astype(float)
    p = histogram / histogram.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return float(terms.sum(axis=1).mean())


def test_iid_sizes_are_near_equal() -> None:
    assert [len(p) for p in iid(10, 3, rng())] == [4, 3, 3]


def test_dirichlet_small_alpha_skews_labels_more_than_large_alpha() -> None:
    labels = np.repeat(np.arange(10, dtype=np.int64), 100)
    skewed = [mean_label_entropy(dirichlet(labels, 10, 0.1, rng(s)), labels, 10) for s in range(5)]
    near_iid = [mean_label_entropy(dirichlet(labels, 10, 100.0, rng(s)), labels, 10) for s in range(5)]
    assert max(skewed) < min(near_iid)
    assert np.mean(near_iid) > 0.95 * np.log(10)  # close to uniform over 10 classes
    assert np.mean(skewed) < 0.6 * np.log(10)


def test_dirichlet_tops_up_short_clients_when_no_draw_fills_them() -> None:
    labels = np.zeros(100, dtype=np.int64)  # one class, alpha 0.01: nearly everything lands on one client
    parts = dirichlet(labels, 50, 0.01, rng(), min_size=2, max_tries=5)
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    assert min(len(p) for p in parts) == 2


def test_dirichlet_top_up_keeps_the_label_skew_of_many_small_clients() -> None:
    # 1,000 clients over ~1,400 samples (the benchmark's setting): every draw leaves clients empty.
    labels = np.repeat(np.arange(10, dtype=np.int64), 144)
    parts = dirichlet(labels, 1000, 0.5, rng(), max_tries=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
    assert min(len(p) for p in parts) >= 1
    # Where skew is measurable (100 clients of 5+ samples, alpha 0.1), topped-up parts stay skewed: the same
    # client sizes with labels dealt at random have about twice the label entropy.
    parts = dirichlet(labels, 100, 0.1, rng(), min_size=5, max_tries=2)
    assert min(len(p) for p in parts) == 5
    shuffled = rng(1).permutation(labels)
    assert mean_label_entropy(parts, labels, 10) < 0.7 * mean_label_entropy(parts, shuffled, 10)


def test_shards_on_balanced_data_give_each_client_at_most_two_labels() -> None:
    labels = np.repeat(np.arange(10, dtype=np.int64), 600)  # 6,000 samples -> 200 pure shards of 30
    parts = shards(labels, 100, 2, rng())
    labels_per_client = (label_histogram(parts, labels, 10) > 0).sum(axis=1)
    assert labels_per_client.max() <= 2
    assert all(len(p) == 60 for p in parts)


def test_shards_on_unbalanced_data_give_most_clients_at_most_two_labels() -> None:
    counts = np.array([900, 700, 650, 600, 580, 560, 520, 500, 500, 490])
    labels = np.repeat(np.arange(10, dtype=np.int64), counts)
    rng(5).shuffle(labels)
    parts = shards(labels, 100, 2, rng(5))
    labels_per_client = (label_histogram(parts, labels, 10) > 0).sum(axis=1)
    assert np.mean(labels_per_client <= 2) >= 0.8
    assert labels_per_client.max() <= 4


def test_quantity_skew_sizes_vary_and_sum_to_n() -> None:
    parts = quantity_skew(1000, 20, 0.5, rng(), min_size=5)
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() == 1000
    assert sizes.min() >= 5
    assert sizes.max() > 3 * sizes.min()
    assert sizes.std() > 0.5 * sizes.mean()


def test_quantity_skew_large_alpha_is_near_equal() -> None:
    sizes = np.array([len(p) for p in quantity_skew(1000, 10, 1e6, rng())])
    assert np.all(np.abs(sizes - 100) <= 2)


def test_quantity_skew_keeps_labels_iid() -> None:
    labels = np.repeat(np.arange(4, dtype=np.int64), 500)
    parts = quantity_skew(2000, 5, 1.0, rng(), min_size=100)
    histogram = label_histogram(parts, labels, 4)
    shares = histogram / histogram.sum(axis=1, keepdims=True)
    assert np.all(np.abs(shares - 0.25) < 0.1)


def test_natural_follows_groups_in_ascending_id_order() -> None:
    parts = natural(np.array([7, 2, 2, 7, 4, 2]))
    assert [p.tolist() for p in parts] == [[1, 2, 5], [4], [0, 3]]


def test_label_histogram_counts_per_client() -> None:
    parts = [np.array([0, 1, 2]), np.array([3, 4])]
    labels = np.array([0, 2, 2, 1, 0])
    assert label_histogram(parts, labels, 3).tolist() == [[1, 0, 2], [1, 1, 0]]


def test_label_histogram_allows_empty_parts() -> None:
    histogram = label_histogram([np.array([], dtype=np.int64), np.array([0])], np.array([1]), 2)
    assert histogram.tolist() == [[0, 0], [0, 1]]


# -- bad input: a ConfigError that says what is wrong --------------------------------------------------------

LABELS = np.repeat(np.arange(3, dtype=np.int64), 5)  # 15 samples


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: iid(5, 10, rng()), "cannot split 5 samples over 10 clients"),
        (lambda: iid(10, 0, rng()), "num_clients must be >= 1, got 0"),
        (lambda: iid(10, 2.5, rng()), "num_clients must be an integer, got 2.5"),
        (lambda: iid(-1, 1, rng()), "num_samples must be >= 0, got -1"),
        (lambda: iid(10, 2, 42), "rng must be a numpy.random.Generator"),
        (lambda: dirichlet(LABELS, 2, 0.0, rng()), "alpha must be > 0, got 0.0"),
        (lambda: dirichlet(LABELS, 2, -1.0, rng()), "alpha must be > 0, got -1.0"),
        (lambda: dirichlet(LABELS, 2, float("nan"), rng()), "alpha must be a finite number > 0, got nan"),
        (lambda: dirichlet(LABELS, 2, float("inf"), rng()), "alpha must be a finite number > 0, got inf"),
        (lambda: dirichlet(LABELS, 20, 1.0, rng()), "cannot split 15 samples over 20 clients"),
        (
            lambda: dirichlet(LABELS, 4, 1.0, rng(), min_size=4),
            "cannot give 4 clients at least 4 samples each from only 15 samples",
        ),
        (lambda: dirichlet(LABELS, 2, 1.0, rng(), min_size=0), "min_size must be >= 1, got 0"),
        (lambda: dirichlet(LABELS, 2, 1.0, rng(), max_tries=0), "max_tries must be >= 1, got 0"),
        (lambda: dirichlet(LABELS.astype(float), 2, 1.0, rng()), "labels must be integers, got dtype float64"),
        (lambda: dirichlet(LABELS.reshape(3, 5), 2, 1.0, rng()), r"labels must be a 1-D array, got shape \(3, 5\)"),
        (lambda: dirichlet(LABELS - 1, 2, 1.0, rng()), "labels must be >= 0, got -1"),
        (lambda: shards(LABELS, 10, 2, rng()), "shards: 10 clients x 2 shards = 20 shards but only 15 samples"),
        (lambda: shards(LABELS, 2, 0, rng()), "shards_per_client must be >= 1, got 0"),
        (lambda: quantity_skew(100, 5, 0.0, rng()), "alpha must be > 0, got 0.0"),
        (lambda: quantity_skew(3, 5, 1.0, rng()), "cannot split 3 samples over 5 clients"),
        (
            lambda: quantity_skew(10, 5, 1.0, rng(), min_size=3),
            "cannot give 5 clients at least 3 samples each from only 10 samples",
        ),
        (lambda: natural([]), "natural partition needs at least one sample"),
        (lambda: natural([0.5, 1.0]), "groups must be integers"),
        (lambda: natural([-1, 0]), "groups must be >= 0, got -1"),
        (lambda: label_histogram([np.array([0])], np.array([3]), 3), r"label 3 is outside \[0, 3\)"),
        (lambda: label_histogram([np.array([0])], np.array([0]), 0), "num_classes must be >= 1, got 0"),
        (
            lambda: partition(LABELS, 3, PartitionConfig("natural"), rng()),
            "natural partition needs per-sample group ids; this dataset has no natural clients",
        ),
        (
            lambda: partition(LABELS, 4, PartitionConfig("natural"), rng(), groups=np.arange(15) % 3),
            "the dataset has 3 natural clients; set num_clients to 3",
        ),
        (
            lambda: partition(LABELS, 3, PartitionConfig("natural"), rng(), groups=np.arange(10) % 3),
            "groups has 10 entries but there are 15 labels",
        ),
        (lambda: partition(LABELS, 20, PartitionConfig("iid"), rng()), "cannot split 15 samples over 20 clients"),
    ],
)
def test_bad_input_raises_config_error_with_message(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        call()


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="cannot split"):
        iid(1, 2, rng())
