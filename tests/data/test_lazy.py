"""Lazy federations: client ids without a million strings, and client data made only when it is looked up."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest

from fedloom.core.config import PartitionConfig
from fedloom.core.errors import ConfigError, DataError
from fedloom.data.base import ArrayData, ClientData, Dataset
from fedloom.data.federate import federate
from fedloom.data.lazy import ClientIds, LazyFederation, digits_population, partition_index
from fedloom.data.partition import dirichlet, iid

# -- ClientIds ------------------------------------------------------------------------------------------------


def test_client_ids_behave_like_the_list_of_strings():
    ids = ClientIds(1_000_000)
    as_list = [f"client-{k:06d}" for k in range(10)] + [f"client-{k:06d}" for k in range(999_990, 1_000_000)]
    assert len(ids) == 1_000_000
    assert ids[0] == "client-000000"
    assert ids[-1] == "client-999999"
    assert ids[-1_000_000] == "client-000000"
    assert ids[np.int64(42)] == "client-000042"
    assert list(ids[:10]) + list(ids[-10:]) == as_list
    assert list(ids[3:9:2]) == ["client-000003", "client-000005", "client-000007"]
    assert list(ids[5:2:-1]) == ["client-000005", "client-000004", "client-000003"]
    assert list(ids[10:20][2:4]) == ["client-000012", "client-000013"]
    assert isinstance(ids[:10], ClientIds)
    assert list(ids[999_998:2_000_000]) == ["client-999998", "client-999999"]
    assert list(ids[7:3]) == []


def test_client_ids_index_and_contains_parse_the_id():
    ids = ClientIds(1_000_000)
    assert ids.index("client-123456") == 123_456
    assert "client-123456" in ids
    assert ids.number("client-000007") == 7
    for absent in ("client-42", "client-0000042", "client-1000000", "device-000001", "client--00001", 42, None):
        assert absent not in ids
        with pytest.raises(ValueError, match="not in the client ids"):
            ids.index(absent)
    view = ids[10:20:2]
    assert view.index("client-000014") == 2
    assert "client-000013" not in view
    assert "client-000020" not in view
    assert view.number("client-000014") == 14  # the registration number, not the position in the view
    with pytest.raises(ValueError, match="between"):
        ids.index("client-000005", 6)
    assert ids.index("client-000005", 5, 6) == 5


def test_client_ids_out_of_range():
    ids = ClientIds(5)
    with pytest.raises(IndexError):
        ids[5]
    with pytest.raises(IndexError):
        ids[-6]
    with pytest.raises(KeyError):
        ids.number("client-005")
    with pytest.raises(TypeError):
        ids["client-000"]  # type: ignore[call-overload]


def test_client_ids_use_federates_format():
    rows = ArrayData(np.zeros((30, 1), np.float32), np.arange(30) % 3)
    dataset = Dataset("toy", rows, rows, num_classes=3)
    for count in (1, 12, 1001):
        if count <= 30:
            federated = federate(dataset, count, PartitionConfig("iid"), seed=0)
            assert list(ClientIds(count)) == federated.client_ids
    assert ClientIds(1001)[0] == "client-0000"
    assert ClientIds(3, prefix="phone", width=2)[2] == "phone02"
    assert list(ClientIds(0)) == []
    assert "ClientIds" in repr(ClientIds(3))


@pytest.mark.parametrize(("count", "width"), [(-1, None), (1.5, None), (True, None), (1000, 2), (10, 0)])
def test_client_ids_refuse_bad_arguments(count, width):
    with pytest.raises(ConfigError):
        ClientIds(count, width=width)


# -- LazyFederation.from_generator ----------------------------------------------------------------------------


def noise_client(k: int, rng: np.random.Generator) -> ClientData:
    """Client k: 3 + k % 5 rows of Gaussian noise, its number in the labels."""
    n = 3 + k % 5
    return ClientData(ArrayData(rng.normal(size=(n, 4)), np.full(n, k % 7)), ArrayData(rng.normal(size=(1, 4)), [0]))


def same(a: ClientData, b: ClientData) -> bool:
    return all(
        np.array_equal(getattr(getattr(a, s), f), getattr(getattr(b, s), f)) for s in ("train", "test") for f in "xy"
    )


def test_a_clients_data_is_deterministic_and_independent_of_the_others():
    small = LazyFederation.from_generator("noise", 10, noise_client, num_classes=7, seed=3, cache_size=0)
    large = LazyFederation.from_generator("noise", 1_000_000, noise_client, num_classes=7, seed=3, cache_size=0)
    first = small.clients["client-005"]
    # Another federation size (so other ids), another lookup order, a second lookup: the same data.
    for cid in ("client-000009", "client-000001"):
        large.clients[cid]
    assert same(first, large.clients["client-000005"])
    assert same(first, small.clients["client-005"])
    assert same(first, noise_client(5, np.random.default_rng([3, 5])))
    assert not same(first, small.clients["client-006"])
    other_seed = LazyFederation.from_generator("noise", 10, noise_client, num_classes=7, seed=4)
    assert not same(first, other_seed.clients["client-005"])


def test_clients_is_a_lazy_mapping_with_a_bounded_cache():
    made: list[int] = []

    def make(k: int, rng: np.random.Generator) -> ClientData:
        made.append(k)
        return noise_client(k, rng)

    federation = LazyFederation.from_generator("noise", 100, make, num_classes=7, cache_size=2)
    clients = federation.clients
    assert len(clients) == 100
    assert "client-042" in clients
    assert "client-100" not in clients
    assert "nobody" not in clients
    assert list(clients)[:2] == ["client-000", "client-001"]
    assert made == []  # neither len, in nor iterating the keys made a client
    clients["client-001"], clients["client-002"], clients["client-001"], clients["client-003"]
    assert made == [1, 2, 3]  # client 1 was cached; 3 then evicted 2, the least recently used
    clients["client-002"]
    assert made == [1, 2, 3, 2]
    with pytest.raises(KeyError):
        clients["client-100"]
    assert federation.name == "noise"
    assert federation.num_classes == 7
    assert federation.central_test is None
    assert federation.client_ids[-1] == "client-099"


def test_make_client_must_return_client_data():
    federation = LazyFederation("bad", 3, lambda k: (k, k), num_classes=2)  # type: ignore[arg-type,return-value]
    with pytest.raises(DataError, match=r"client-001.*tuple"):
        federation.clients["client-001"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_clients": 0},
        {"num_clients": 2.0},
        {"num_classes": 0},
        {"seed": -1},
        {"cache_size": -1},
        {"make_client": "not a function"},
        {"central_test": np.zeros(3)},
    ],
)
def test_from_generator_refuses_bad_arguments(kwargs):
    arguments = {"name": "x", "num_clients": 5, "make_client": noise_client, "num_classes": 7, **kwargs}
    with pytest.raises(ConfigError):
        LazyFederation.from_generator(**arguments)


def test_a_million_clients_are_cheap_to_create_and_sample():
    def make(k: int, rng: np.random.Generator) -> ClientData:
        x = rng.normal(size=(20, 64)).astype(np.float32)
        y = rng.integers(0, 10, size=20)
        return ClientData(ArrayData(x[:16], y[:16]), ArrayData(x[16:], y[16:]))

    started = time.perf_counter()
    LazyFederation.from_generator("million", 1_000_000, make, num_classes=10)
    assert time.perf_counter() - started < 0.1

    tracemalloc.start()
    try:
        federation = LazyFederation.from_generator("million", 1_000_000, make, num_classes=10)
        sampled = np.random.default_rng(0).choice(len(federation.client_ids), size=1000, replace=False)
        rows = sum(len(federation.clients[federation.client_ids[k]].train) for k in sampled)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows == 16_000
    assert peak < 50 * 2**20, f"{peak / 2**20:.1f} MiB"


# -- LazyFederation.from_index --------------------------------------------------------------------------------


def pool_dataset(n: int = 120) -> Dataset:
    """Rows whose first feature is the row's own index, so a client's rows can be traced back."""
    x = np.stack([np.arange(n, dtype=np.float32), np.ones(n, np.float32)], axis=1)
    train = ArrayData(x, np.arange(n) % 4)
    return Dataset("pool", train, train.subset(np.arange(10)), num_classes=4)


def test_partition_index_is_the_csr_form_of_the_parts():
    offsets, indices = partition_index([np.array([0, 3]), np.array([], dtype=np.int64), [2, 4, 5]])
    assert offsets.tolist() == [0, 2, 2, 5]
    assert indices.tolist() == [0, 3, 2, 4, 5]
    empty_offsets, empty_indices = partition_index([])
    assert empty_offsets.tolist() == [0]
    assert empty_indices.size == 0


def test_from_index_reproduces_a_regular_partition():
    dataset = pool_dataset()
    train_parts = dirichlet(dataset.train.y, 8, alpha=0.5, rng=np.random.default_rng(0))
    test_parts = iid(len(dataset.train), 8, np.random.default_rng(1))
    federation = LazyFederation.from_index(
        "pool",
        dataset,
        *partition_index(train_parts),
        test_offsets=partition_index(test_parts)[0],
        test_indices=partition_index(test_parts)[1],
    )
    assert len(federation.client_ids) == 8
    assert federation.num_classes == 4
    assert federation.central_test is dataset.test
    for cid, train_part, test_part in zip(federation.client_ids, train_parts, test_parts, strict=True):
        client = federation.clients[cid]
        expected = ClientData(dataset.train.subset(train_part), dataset.train.subset(test_part))
        assert same(client, expected)


def test_from_index_holdout_splits_each_clients_rows():
    dataset = pool_dataset()
    parts = iid(len(dataset.train), 6, np.random.default_rng(0))
    offsets, indices = partition_index(parts)
    federation = LazyFederation.from_index("pool", dataset.train, offsets, indices, holdout=0.25, num_classes=4)
    assert federation.central_test is None
    for cid, part in zip(federation.client_ids, parts, strict=True):
        client = federation.clients[cid]
        assert len(client.test) == len(part) // 4
        rows = np.concatenate([client.train.x[:, 0], client.test.x[:, 0]]).astype(np.int64)
        assert sorted(rows.tolist()) == part.tolist()
    again = LazyFederation.from_index("pool", dataset.train, offsets, indices, holdout=0.25, num_classes=4)
    assert same(again.clients["client-003"], federation.clients["client-003"])
    no_test = LazyFederation.from_index("pool", dataset, offsets, indices)
    assert len(no_test.clients["client-000"].test) == 0


@pytest.mark.parametrize(
    ("offsets", "indices", "kwargs", "message"),
    [
        ([1, 2], [0, 1], {}, "start at 0"),
        ([0, 2, 1, 2], [0, 1], {}, "never decrease"),
        ([0, 1], [0, 1], {}, "end at"),
        ([0], [], {}, "at least 2"),
        ([0, 2], [0, 120], {}, r"in \[0, 120\)"),
        ([0, 2], [0.0, 1.0], {}, "integer"),
        ([0, 2], [0, 1], {"test_offsets": [0, 1]}, "both"),
        ([0, 2], [0, 1], {"test_offsets": [0, 1, 1], "test_indices": [3]}, "describe 2 clients"),
        ([0, 2], [0, 1], {"holdout": 1.0}, "holdout"),
    ],
)
def test_from_index_refuses_an_index_that_does_not_fit(offsets, indices, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LazyFederation.from_index("pool", pool_dataset(), np.array(offsets), np.array(indices), **kwargs)


def test_from_index_needs_num_classes_for_an_array_pool():
    with pytest.raises(ConfigError, match="num_classes"):
        LazyFederation.from_index("pool", pool_dataset().train, [0, 1], [0])
    with pytest.raises(ConfigError, match="pool"):
        LazyFederation.from_index("pool", np.zeros(3), [0, 1], [0], num_classes=2)  # type: ignore[arg-type]


# -- digits_population ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def population() -> LazyFederation:
    return digits_population(1_000_000, seed=0)


def test_digits_population_clients_hold_skewed_rows_of_the_digits_pool(population):
    from fedloom.data.datasets.digits import load_digits

    pool = load_digits().train
    assert population.num_classes == 10
    assert population.central_test is not None
    assert len(population.central_test) == 360
    sizes, distinct_labels = [], []
    for k in range(0, 1_000_000, 10_007):
        client = population.clients[population.client_ids[k]]
        n = len(client.train) + len(client.test)
        assert n >= 2
        assert len(client.train) >= 1
        assert len(client.test) == min(int(0.2 * n), n - 1)
        for split in (client.train, client.test):
            # every row is a row of the pool with its own label
            matches = (split.x[:, None, :] == pool.x[None, :, :]).all(axis=2)
            assert matches.any(axis=1).all()
            assert all(split.y[i] in pool.y[matches[i]] for i in range(len(split)))
        sizes.append(n)
        distinct_labels.append(len(np.unique(np.concatenate([client.train.y, client.test.y]))))
    assert 15 < np.mean(sizes) < 25
    assert np.mean(distinct_labels) < 7  # Dirichlet(0.5) label skew: a client sees a few digits, not all 10


def test_digits_population_is_reproducible(population):
    again = digits_population(10, seed=0)
    assert same(again.clients["client-007"], population.clients["client-000007"])
    assert not same(digits_population(10, seed=1).clients["client-007"], again.clients["client-007"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_clients": 0},
        {"seed": -1},
        {"alpha": 0.0},
        {"alpha": float("nan")},
        {"mean_size": 1},
        {"size_sigma": -0.1},
        {"holdout": 1.0},
        {"holdout": "0.2"},
    ],
)
def test_digits_population_refuses_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        digits_population(**{"num_clients": 10, **kwargs})
