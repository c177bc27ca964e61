"""``federate``: turn a centralized :class:`Dataset` into the :class:`FederatedData` of a simulation."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedloom.core.config import PartitionConfig
from fedloom.core.counting import share_of
from fedloom.core.errors import ConfigError, DataError
from fedloom.data.base import ClientData, Dataset, FederatedData
from fedloom.data.partition import label_histogram
from fedloom.data.partition import partition as split_indices

__all__ = ["federate"]

# Mixed into the seed so the partition's random stream differs from other streams drawn from the same seed.
_SEED_SALT = 0x5EED


def _client_ids(count: int) -> list[str]:
    width = max(3, len(str(count - 1)))
    return [f"client-{i:0{width}d}" for i in range(count)]


def _holdout_split(
    part: npt.NDArray[np.int64], holdout: float, rng: np.random.Generator
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Shuffle ``part`` and keep the last ``floor(holdout * n)`` indices (at most ``n - 1``) as test."""
    shuffled = rng.permutation(part)
    num_test = min(share_of(holdout, len(part)), len(part) - 1)
    cut = len(part) - num_test
    return np.sort(shuffled[:cut]), np.sort(shuffled[cut:])


def _natural_names(dataset: Dataset, group_ids: npt.NDArray[np.int64]) -> list[str]:
    names = dataset.group_names
    if names is None:
        return _client_ids(len(group_ids))
    if int(group_ids.max()) >= len(names):
        raise DataError(
            f"dataset {dataset.name!r} has group id {int(group_ids.max())} but only {len(names)} group names"
        )
    chosen = [names[g] for g in group_ids]
    if len(set(chosen)) != len(chosen):
        raise DataError(f"dataset {dataset.name!r} has duplicate group names: {chosen}")
    return chosen


def federate(
    dataset: Dataset, num_clients: int, partition: PartitionConfig, seed: int, holdout: float = 0.2
) -> FederatedData:
    """Split ``dataset`` over ``num_clients`` simulated clients as ``partition`` says, reproducibly.

    For every scheme but ``natural``, ``dataset.train`` is partitioned by its labels; each client's share is
    shuffled and its last ``floor(holdout * n)`` examples become that client's test split, always leaving at
    least one training example (so a client with one example has an empty test split). For ``natural``, a
    dataset group is a client: its train and test splits are its own rows of ``dataset.train`` and
    ``dataset.test``, and ``holdout`` is ignored (test rows of a group with no training rows belong to no
    client). In both cases ``central_test`` is ``dataset.test``.

    Client ids are ``client-000``, ``client-001``, ... (wider when there are more than 1000 clients), or the
    dataset's ``group_names`` for a natural partition. ``label_histogram`` counts each client's train and test
    examples per class. The same arguments always give the same result.

    Raises :class:`ConfigError` for invalid settings (more clients than training samples, a ``holdout``
    outside ``[0, 1)``, a negative ``seed``, ``natural`` on a dataset without groups or with another number
    of clients), and :class:`DataError` when the dataset's group names do not fit its groups.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ConfigError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if not 0.0 <= holdout < 1.0:
        raise ConfigError(f"holdout must be in [0, 1), got {holdout}")
    partition_seq, holdout_seq = np.random.SeedSequence([int(seed), _SEED_SALT]).spawn(2)
    train, test = dataset.train, dataset.test

    if partition.scheme == "natural":
        if dataset.train_groups is None or dataset.test_groups is None:
            raise ConfigError(f"a natural partition needs natural clients; dataset {dataset.name!r} has none")
        train_parts = _partition(dataset, num_clients, partition, partition_seq)
        # The partitioner makes one client per distinct training group, in ascending id order.
        group_ids = np.unique(np.asarray(dataset.train_groups)).astype(np.int64)
        test_groups = np.asarray(dataset.test_groups)
        test_parts = [np.flatnonzero(test_groups == g).astype(np.int64) for g in group_ids]
        ids = _natural_names(dataset, group_ids)
        clients = {
            cid: ClientData(train.subset(tr), test.subset(te))
            for cid, tr, te in zip(ids, train_parts, test_parts, strict=True)
        }
        histogram = label_histogram(train_parts, train.y, dataset.num_classes) + label_histogram(
            test_parts, test.y, dataset.num_classes
        )
    else:
        if num_clients > len(train):
            raise ConfigError(f"cannot split {len(train)} training samples over {num_clients} clients")
        parts = _partition(dataset, num_clients, partition, partition_seq)
        rng = np.random.default_rng(holdout_seq)
        clients = {}
        for cid, part in zip(_client_ids(len(parts)), parts, strict=True):
            own_train, own_test = _holdout_split(part, holdout, rng)
            clients[cid] = ClientData(train.subset(own_train), train.subset(own_test))
        histogram = label_histogram(parts, train.y, dataset.num_classes)

    return FederatedData(
        clients=clients,
        central_test=test,
        num_classes=dataset.num_classes,
        name=dataset.name,
        label_histogram=histogram,
    )


def _partition(
    dataset: Dataset, num_clients: int, config: PartitionConfig, seed: np.random.SeedSequence
) -> list[npt.NDArray[np.int64]]:
    return split_indices(
        dataset.train.y,
        num_clients,
        config,
        np.random.default_rng(seed),
        groups=dataset.train_groups,
    )
