"""Data containers: arrays for one split, a centralized ``Dataset``, and the ``FederatedData`` of a simulation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fedloom.core.errors import DataError

__all__ = ["ArrayData", "ClientData", "Dataset", "FederatedData", "Federation"]


@dataclass(frozen=True)
class ArrayData:
    """Features ``x`` (first axis: examples) and labels ``y`` (integer class ids), of equal length."""

    x: npt.NDArray[np.generic]
    y: npt.NDArray[np.generic]

    def __post_init__(self) -> None:
        object.__setattr__(self, "x", np.asarray(self.x))
        object.__setattr__(self, "y", np.asarray(self.y))
        if self.x.ndim < 1 or self.y.ndim != 1:
            raise DataError(f"x needs one row per example and y must be 1-D; got shapes {self.x.shape}, {self.y.shape}")
        if len(self.x) != len(self.y):
            raise DataError(f"x has {len(self.x)} rows but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: npt.NDArray[np.integer]) -> ArrayData:
        return ArrayData(self.x[indices], self.y[indices])


@dataclass(frozen=True)
class ClientData:
    """One client's data: what it trains on, and its held-out split for federated evaluation (may be empty)."""

    train: ArrayData
    test: ArrayData


@dataclass(frozen=True)
class Dataset:
    """A centralized dataset with a train and a test split.

    ``train_groups``/``test_groups``, when given, hold each row's natural client (a hospital, a device); a
    dataset with them can be partitioned ``natural``ly, and then each client's test split is its own rows of
    ``test``. ``group_names`` names the groups in order of their integer ids.
    """

    name: str
    train: ArrayData
    test: ArrayData
    num_classes: int
    train_groups: npt.NDArray[np.integer] | None = None
    test_groups: npt.NDArray[np.integer] | None = None
    group_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 1:
            raise DataError(f"{self.name}: num_classes must be a whole number >= 1, got {self.num_classes!r}")
        for split, data in (("train", self.train), ("test", self.test)):
            y = data.y
            if len(y) and not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
                raise DataError(f"{self.name}: {split} labels must be integer class ids, got dtype {y.dtype}")
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise DataError(
                    f"{self.name}: {split} labels must lie in [0, {self.num_classes}), got [{y.min()}, {y.max()}]"
                )
        if self.train.x.shape[1:] != self.test.x.shape[1:]:
            raise DataError(
                f"{self.name}: train examples have shape {self.train.x.shape[1:]} but test examples "
                f"{self.test.x.shape[1:]}"
            )
        if (self.train_groups is None) != (self.test_groups is None):
            raise DataError("give both train_groups and test_groups, or neither")
        if self.train_groups is not None and len(self.train_groups) != len(self.train):
            raise DataError("train_groups must have one entry per training row")
        if self.test_groups is not None and len(self.test_groups) != len(self.test):
            raise DataError("test_groups must have one entry per test row")

    @property
    def has_groups(self) -> bool:
        return self.train_groups is not None

    @classmethod
    def from_groups(
        cls,
        name: str,
        groups: Sequence[tuple[ArrayData, ArrayData]],
        num_classes: int,
        group_names: tuple[str, ...] | None = None,
    ) -> Dataset:
        """A natural federation from each group's own ``(train, test)`` split, in order: group ``k`` gets id
        ``k``, and ``train``/``test`` are the groups' splits concatenated."""

        def joined(split: int) -> tuple[ArrayData, npt.NDArray[np.int64]]:
            parts = [pair[split] for pair in groups]
            data = ArrayData(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
            ids = np.concatenate([np.full(len(p), k, dtype=np.int64) for k, p in enumerate(parts)])
            return data, ids

        (train, train_groups), (test, test_groups) = joined(0), joined(1)
        return cls(name, train, test, num_classes, train_groups, test_groups, group_names)


class Federation(Protocol):
    """What a simulation runs on: clients by id and the server's test set. :class:`FederatedData` holds every
    client's data in memory; a :class:`fedloom.data.LazyFederation` makes a client's data only when asked."""

    @property
    def clients(self) -> Mapping[str, ClientData]: ...

    @property
    def client_ids(self) -> Sequence[str]: ...

    @property
    def central_test(self) -> ArrayData | None: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def name(self) -> str: ...


@dataclass(frozen=True)
class FederatedData:
    """What a simulation runs on: each client's data by client id (in order), and the server's test set."""

    clients: Mapping[str, ClientData]
    central_test: ArrayData | None
    num_classes: int
    name: str = ""
    label_histogram: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros((0, 0), np.int64))

    def __post_init__(self) -> None:
        object.__setattr__(self, "clients", MappingProxyType(dict(self.clients)))

    @property
    def client_ids(self) -> list[str]:
        return list(self.clients)
