"""``federate``: a centralized dataset becomes reproducible per-client train/test splits."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.core.config import PartitionConfig
from fedloom.core.errors import ConfigError, DataError
from fedloom.data.base import ArrayData, Dataset, FederatedData
from fedloom.data.federate import federate


def make_dataset(
    num_train: int = 200,
    num_test: int = 50,
    num_classes: int = 5,
    groups: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None = None,
    group_names: tuple[str, ...] | None = None,
) -> Dataset:
    """Rows whose first feature is the row's own index, so a client's rows can be traced back."""

    def split(n: int, offset: int) -> ArrayData:
        x = np.stack([np.arange(n, dtype=np.float32), np.full(n, offset, np.float32)], axis=1)
        y = (np.arange(n) * 7 + offset) % num_classes
        return ArrayData(x, y.astype(np.int64))

    return Dataset(
        name="toy",
        train=split(num_train, 0),
        test=split(num_test, 1),
        num_classes=num_classes,
        train_groups=None if groups is None else groups[0],
        test_groups=None if groups is None else groups[1],
        group_names=group_names,
    )


def rows(data: ArrayData) -> npt.NDArray[np.int64]:
    indices: npt.NDArray[np.int64] = data.x[:, 0].astype(np.int64)
    return indices


def assert_equal_federations(a: FederatedData, b: FederatedData) -> None:
    assert a.client_ids == b.client_ids
    for cid in a.client_ids:
        for split in ("train", "test"):
            left, right = getattr(a.clients[cid], split), getattr(b.clients[cid], split)
            assert np.array_equal(left.x, right.x)
            assert np.array_equal(left.y, right.y)
    assert np.array_equal(a.label_histogram, b.label_histogram)


SCHEMES = [
    PartitionConfig("iid"),
    PartitionConfig("dirichlet", alpha=1.0),
    PartitionConfig("shards", shards_per_client=2),
    PartitionConfig("quantity", alpha=1.0),
]


@settings(max_examples=50, deadline=None)
@given(
    config=st.sampled_from(SCHEMES),
    num_clients=st.integers(1, 8),
    extra=st.integers(0, 150),
    holdout=st.sampled_from([0.0, 0.1, 0.2, 0.29, 0.5, 0.9]),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_training_row_lands_in_exactly_one_client_split(
    config: PartitionConfig, num_clients: int, extra: int, holdout: float, seed: int
) -> None:
    dataset = make_dataset(num_train=30 * num_clients + extra)
    fed = federate(dataset, num_clients, config, seed=seed, holdout=holdout)

    assert len(fed.clients) == num_clients
    seen = []
    for client in fed.clients.values():
        train, test = rows(client.train), rows(client.test)
        total = len(train) + len(test)
        assert len(train) >= 1
        assert len(test) == min(math.floor(holdout * total + 1e-9), total - 1)
        assert np.array_equal(client.train.y, dataset.train.y[train])
        assert np.array_equal(client.test.y, dataset.train.y[test])
        seen.extend([train, test])
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(len(dataset.train)))

    assert fed.label_histogram.shape == (num_clients, dataset.num_classes)
    assert np.array_equal(fed.label_histogram.sum(axis=0), np.bincount(dataset.train.y, minlength=5))
    for row, client in zip(fed.label_histogram, fed.clients.values(), strict=True):
        expected = np.bincount(np.concatenate([client.train.y, client.test.y]), minlength=5)
        assert np.array_equal(row, expected)

    assert_equal_federations(fed, federate(dataset, num_clients, config, seed=seed, holdout=holdout))


@pytest.mark.parametrize("config", SCHEMES, ids=lambda c: c.scheme)
def test_different_seeds_give_different_federations(config: PartitionConfig) -> None:
    dataset = make_dataset()
    a = federate(dataset, 5, config, seed=0)
    b = federate(dataset, 5, config, seed=1)
    assert any(not np.array_equal(rows(a.clients[cid].train), rows(b.clients[cid].train)) for cid in a.client_ids)


def test_holdout_does_not_change_which_rows_a_client_owns() -> None:
    dataset = make_dataset()
    config = PartitionConfig("dirichlet", alpha=0.5)
    without = federate(dataset, 4, config, seed=3, holdout=0.0)
    with_holdout = federate(dataset, 4, config, seed=3, holdout=0.3)
    for cid in without.client_ids:
        client = with_holdout.clients[cid]
        owned = np.sort(np.concatenate([rows(client.train), rows(client.test)]))
        assert len(client.test) > 0
        assert np.array_equal(owned, rows(without.clients[cid].train))
        assert len(without.clients[cid].test) == 0


def test_result_fields() -> None:
    dataset = make_dataset()
    fed = federate(dataset, 3, PartitionConfig("iid"), seed=0)
    assert fed.client_ids == ["client-000", "client-001", "client-002"]
    assert fed.central_test is dataset.test
    assert fed.num_classes == 5
    assert fed.name == "toy"
    assert fed.label_histogram.dtype == np.int64


def test_client_ids_widen_past_a_thousand_clients() -> None:
    fed = federate(make_dataset(num_train=1001), 1001, PartitionConfig("iid"), seed=0)
    assert fed.client_ids[0] == "client-0000"
    assert fed.client_ids[-1] == "client-1000"
    assert all(len(c.train) == 1 and len(c.test) == 0 for c in fed.clients.values())


def test_holdout_fraction_is_floored_and_keeps_one_training_example() -> None:
    fed = federate(make_dataset(num_train=100), 10, PartitionConfig("iid"), seed=0, holdout=0.25)
    assert {(len(c.train), len(c.test)) for c in fed.clients.values()} == {(8, 2)}
    tiny = federate(make_dataset(num_train=2), 2, PartitionConfig("iid"), seed=0, holdout=0.9)
    assert {(len(c.train), len(c.test)) for c in tiny.clients.values()} == {(1, 0)}
    almost_all = federate(make_dataset(num_train=10), 1, PartitionConfig("iid"), seed=0, holdout=0.95)
    assert (len(almost_all.clients["client-000"].train), len(almost_all.clients["client-000"].test)) == (1, 9)


# -- natural partitions -------------------------------------------------------------------------------------


def natural_dataset(group_names: tuple[str, ...] | None = ("cleveland", "hungary", "switzerland")) -> Dataset:
    train_groups = np.array([2, 0, 0, 1, 2, 2, 0, 1, 1, 0] * 3, dtype=np.int64)
    test_groups = np.array([0, 1, 2, 2, 1, 0, 0, 2], dtype=np.int64)
    return make_dataset(
        num_train=30, num_test=8, num_classes=3, groups=(train_groups, test_groups), group_names=group_names
    )


def test_natural_partition_gives_each_group_its_own_rows() -> None:
    dataset = natural_dataset()
    fed = federate(dataset, 3, PartitionConfig("natural"), seed=0, holdout=0.5)
    assert fed.client_ids == ["cleveland", "hungary", "switzerland"]
    assert dataset.train_groups is not None
    assert dataset.test_groups is not None
    for group, cid in enumerate(fed.client_ids):
        client = fed.clients[cid]
        assert np.array_equal(rows(client.train), np.flatnonzero(dataset.train_groups == group))
        assert np.array_equal(rows(client.test), np.flatnonzero(dataset.test_groups == group))
    assert fed.central_test is dataset.test
    hist = fed.label_histogram
    assert hist.shape == (3, 3)
    assert hist.sum() == 30 + 8
    assert np.array_equal(hist.sum(axis=0), np.bincount(np.concatenate([dataset.train.y, dataset.test.y]), minlength=3))


def test_natural_partition_without_group_names_numbers_the_clients() -> None:
    fed = federate(natural_dataset(group_names=None), 3, PartitionConfig("natural"), seed=0)
    assert fed.client_ids == ["client-000", "client-001", "client-002"]


def test_natural_partition_does_not_depend_on_the_seed() -> None:
    dataset = natural_dataset()
    assert_equal_federations(
        federate(dataset, 3, PartitionConfig("natural"), seed=0),
        federate(dataset, 3, PartitionConfig("natural"), seed=99),
    )


# -- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 2000}, "cannot split 200 training samples over 2000 clients"),
        ({"num_clients": 0}, "num_clients must be an integer >= 1, got 0"),
        ({"holdout": 1.0}, r"holdout must be in \[0, 1\), got 1.0"),
        ({"holdout": -0.1}, r"holdout must be in \[0, 1\), got -0.1"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"partition": PartitionConfig("natural")}, "natural partition needs natural clients; dataset 'toy' has none"),
    ],
)
def test_bad_settings_raise_config_error(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"num_clients": 4, "partition": PartitionConfig("iid"), "seed": 0}
    arguments.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        federate(make_dataset(), **arguments)


def test_natural_partition_needs_the_dataset_number_of_clients() -> None:
    with pytest.raises(ConfigError, match="the dataset has 3 natural clients; set num_clients to 3"):
        federate(natural_dataset(), 5, PartitionConfig("natural"), seed=0)


def test_group_names_must_cover_the_groups() -> None:
    with pytest.raises(DataError, match="has group id 2 but only 2 group names"):
        federate(natural_dataset(group_names=("a", "b")), 3, PartitionConfig("natural"), seed=0)
    with pytest.raises(DataError, match="duplicate group names"):
        federate(natural_dataset(group_names=("a", "b", "a")), 3, PartitionConfig("natural"), seed=0)
