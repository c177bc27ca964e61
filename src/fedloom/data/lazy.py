"""Lazy federations: a million registered clients whose data exists only while a client is being asked.

A cross-device simulation registers far more clients than it ever holds in memory: each round samples a few
thousand of them. :class:`ClientIds` names the clients without a million strings, and :class:`LazyFederation`
implements the :class:`~fedloom.data.base.Federation` protocol by materializing a client's data on demand,
from a generator (:meth:`LazyFederation.from_generator`) or from a partition index into a shared pool of rows
(:meth:`LazyFederation.from_index`). :func:`digits_population` is a ready-made population over the digits.

>>> federation = digits_population(1_000_000, seed=0)
>>> federation.client_ids[123_456]
'client-123456'
>>> len(federation.clients["client-123456"].train) > 0
True
"""

from __future__ import annotations

import math
import numbers
import operator
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import overload

import numpy as np
import numpy.typing as npt

from fedloom.core.counting import share_of
from fedloom.core.errors import ConfigError, DataError
from fedloom.core.strictjson import finite_float
from fedloom.data.base import ArrayData, ClientData, Dataset

__all__ = ["ClientIds", "LazyFederation", "digits_population", "partition_index"]

# Mixed into the per-client seed of a holdout split, so that it differs from a generator's stream for that client.
_HOLDOUT_SALT = 0x401D
# The default number of materialized clients a federation keeps: about one round's worth, so that a wrapper that
# looks at a client's data (its size) and the backend that trains on it build it only once.
DEFAULT_CACHE_SIZE = 1024


def _whole(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


class ClientIds(Sequence[str]):
    """The ids ``prefix + zero-padded number`` of clients ``0 .. count-1``, made when asked for.

    The default format is :func:`~fedloom.data.federate`'s (``client-000``, ... ``client-999999``: at least 3
    digits, more when ``count`` needs them), so a lazy and an in-memory federation of the same size name their
    clients alike. Indexing (negative indices and slices too), ``len``, ``in`` and :meth:`index` work as on a
    list of the strings, in O(1) time and memory; a slice is again a ``ClientIds``.
    :meth:`number` gives a client's registration number (its position in the full, unsliced sequence).

    >>> ids = ClientIds(1_000_000)
    >>> ids[0], ids[-1], ids.index("client-000042"), "client-42" in ids
    ('client-000000', 'client-999999', 42, False)
    """

    def __init__(self, count: int, prefix: str = "client-", width: int | None = None) -> None:
        count = _whole(count, "count", 0)
        if not isinstance(prefix, str):
            raise ConfigError(f"prefix must be a string, got {prefix!r}")
        digits = len(str(max(count - 1, 0)))
        if width is None:
            width = max(3, digits)
        elif _whole(width, "width", 1) < digits:
            raise ConfigError(f"width {width} is too narrow for {count} clients")
        self._prefix = prefix
        self._width = int(width)
        self._numbers = range(count)

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def width(self) -> int:
        return self._width

    def _name(self, number: int) -> str:
        return f"{self._prefix}{number:0{self._width}d}"

    def number(self, client_id: object) -> int:
        """The registration number ``k`` of ``client_id`` (``"client-000042"`` -> 42).

        Only the canonical spelling is accepted (prefix, then exactly ``width`` digits). Raises ``KeyError`` for
        anything that is not one of these ids, and for a client outside this (possibly sliced) sequence.
        """
        if isinstance(client_id, str) and client_id.startswith(self._prefix):
            digits = client_id[len(self._prefix) :]
            if len(digits) == self._width and digits.isascii() and digits.isdigit():
                number = int(digits)
                if number in self._numbers:
                    return number
        raise KeyError(client_id)

    def __len__(self) -> int:
        return len(self._numbers)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> ClientIds: ...

    def __getitem__(self, index: int | slice) -> str | ClientIds:
        if isinstance(index, slice):
            view = ClientIds.__new__(ClientIds)
            view._prefix, view._width, view._numbers = self._prefix, self._width, self._numbers[index]
            return view
        # range indexing raises IndexError out of range and accepts NumPy integers through __index__.
        return self._name(self._numbers[operator.index(index)])

    def __iter__(self) -> Iterator[str]:
        return map(self._name, self._numbers)

    def __contains__(self, client_id: object) -> bool:
        try:
            self.number(client_id)
        except KeyError:
            return False
        return True

    def index(self, value: object, start: int = 0, stop: int | None = None) -> int:
        """The position of ``value``; raises ``ValueError`` where it is not in ``self[start:stop]``."""
        try:
            position = self._numbers.index(self.number(value))
        except KeyError:
            raise ValueError(f"{value!r} is not in the client ids") from None
        if position not in range(*slice(start, stop).indices(len(self))):
            raise ValueError(f"{value!r} is not in the client ids between {start} and {stop}")
        return position

    def __repr__(self) -> str:
        if len(self) == 0:
            return "ClientIds([])"
        return f"ClientIds([{self[0]!r} .. {self[-1]!r}], {len(self)} ids)"


class _LazyClients(Mapping[str, ClientData]):
    """``client id -> ClientData``, built by ``make(k)`` when looked up, the last ``cache_size`` ones kept."""

    def __init__(self, ids: ClientIds, make: Callable[[int], ClientData], cache_size: int) -> None:
        self._ids = ids
        self._make = make
        self._cache_size = cache_size
        self._cache: OrderedDict[int, ClientData] = OrderedDict()

    def __getitem__(self, client_id: str) -> ClientData:
        number = self._ids.number(client_id)
        data = self._cache.pop(number, None)
        if data is None:
            data = self._make(number)
            if not isinstance(data, ClientData):
                raise DataError(f"the data of client {client_id} is a {type(data).__name__}, not a ClientData")
        if self._cache_size:
            self._cache[number] = data  # (re)inserted last: the most recently used
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return data

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._ids  # without materializing the client, as Mapping's default would

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


class LazyFederation:
    """A :class:`~fedloom.data.base.Federation` whose clients' data is made only when a client is looked up.

    ``make_client(k)`` returns the data of client ``k`` (``0 <= k < num_clients``, named ``client_ids[k]``);
    it must return the same data every time, since a client may be looked up more than once. The
    ``cache_size`` most recently used clients are kept (0: none), so a round's clients are built once even when
    both a wrapper and the backend look at them. Usually built with :meth:`from_generator` or
    :meth:`from_index`. Looking up an unknown id raises ``KeyError``; ``make_client`` returning something other
    than a :class:`ClientData` raises :class:`DataError`.
    """

    def __init__(
        self,
        name: str,
        num_clients: int,
        make_client: Callable[[int], ClientData],
        num_classes: int,
        central_test: ArrayData | None = None,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if not callable(make_client):
            raise ConfigError("make_client must be a function of the client number")
        if central_test is not None and not isinstance(central_test, ArrayData):
            raise ConfigError(f"central_test must be an ArrayData or None, got {type(central_test).__name__}")
        self._name = str(name)
        self._ids = ClientIds(_whole(num_clients, "num_clients", 1))
        self._num_classes = _whole(num_classes, "num_classes", 1)
        self._central_test = central_test
        self._clients = _LazyClients(self._ids, make_client, _whole(cache_size, "cache_size", 0))

    @property
    def clients(self) -> Mapping[str, ClientData]:
        return self._clients

    @property
    def client_ids(self) -> ClientIds:
        return self._ids

    @property
    def central_test(self) -> ArrayData | None:
        return self._central_test

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"LazyFederation({self._name!r}, {len(self._ids)} clients)"

    @classmethod
    def from_generator(
        cls,
        name: str,
        num_clients: int,
        make_client: Callable[[int, np.random.Generator], ClientData],
        num_classes: int,
        central_test: ArrayData | None = None,
        seed: int = 0,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> LazyFederation:
        """Client ``k``'s data is ``make_client(k, np.random.default_rng([seed, k]))``.

        Each client has its own random stream, so its data depends on ``seed`` and ``k`` alone: not on how
        many clients there are, nor on which others were looked up before.
        """
        seed = _whole(seed, "seed", 0)
        if not callable(make_client):
            raise ConfigError("make_client must be a function of the client number and a random generator")
        return cls(
            name,
            num_clients,
            lambda k: make_client(k, np.random.default_rng([seed, k])),
            num_classes,
            central_test,
            cache_size=cache_size,
        )

    @classmethod
    def from_index(
        cls,
        name: str,
        pool: Dataset | ArrayData,
        offsets: npt.ArrayLike,
        indices: npt.ArrayLike,
        *,
        test_offsets: npt.ArrayLike | None = None,
        test_indices: npt.ArrayLike | None = None,
        holdout: float = 0.0,
        num_classes: int | None = None,
        central_test: ArrayData | None = None,
        seed: int = 0,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> LazyFederation:
        """Clients that own rows of a shared ``pool``, given as a partition index in CSR form.

        Client ``k`` trains on the pool rows ``indices[offsets[k]:offsets[k + 1]]``; there are
        ``len(offsets) - 1`` clients. :func:`partition_index` turns a partitioner's list of parts into this form.
        A million clients with twenty rows each cost two integer arrays (about 90 MB as ``int32``), not a
        million copies of their rows. Its test split is either
        ``test_indices[test_offsets[k]:test_offsets[k + 1]]`` (rows of the same pool), or, without a test
        index, the last ``floor(holdout * n)`` of its rows (at most ``n - 1``) after a shuffle seeded by
        ``seed`` and ``k``; ``holdout=0`` gives every client an empty test split.

        A :class:`Dataset` pool means its ``train`` split, and supplies ``num_classes`` and ``central_test``
        (its ``test`` split) unless they are given. Raises :class:`ConfigError` for an index that does not fit
        the pool (offsets not starting at 0, decreasing, or not ending at ``len(indices)``; a row out of range).
        """
        if isinstance(pool, Dataset):
            num_classes = pool.num_classes if num_classes is None else num_classes
            central_test = pool.test if central_test is None else central_test
            rows = pool.train
        elif isinstance(pool, ArrayData):
            rows = pool
        else:
            raise ConfigError(f"pool must be a Dataset or an ArrayData, got {type(pool).__name__}")
        if num_classes is None:
            raise ConfigError("num_classes is needed when the pool is an ArrayData")
        if not 0.0 <= holdout < 1.0:
            raise ConfigError(f"holdout must be in [0, 1), got {holdout}")
        seed = _whole(seed, "seed", 0)
        train_offsets, train_rows = _check_index(offsets, indices, len(rows), "")
        num_clients = len(train_offsets) - 1
        if (test_offsets is None) != (test_indices is None):
            raise ConfigError("give both test_offsets and test_indices, or neither")
        test_index = None
        if test_offsets is not None and test_indices is not None:
            test_index = _check_index(test_offsets, test_indices, len(rows), "test_")
            if len(test_index[0]) != len(train_offsets):
                raise ConfigError(
                    f"test_offsets describe {len(test_index[0]) - 1} clients but offsets describe {num_clients}"
                )

        def make(k: int) -> ClientData:
            own = train_rows[train_offsets[k] : train_offsets[k + 1]]
            if test_index is not None:
                test_offsets_, test_rows = test_index
                return ClientData(rows.subset(own), rows.subset(test_rows[test_offsets_[k] : test_offsets_[k + 1]]))
            if holdout == 0.0 or len(own) < 2:
                return ClientData(rows.subset(own), rows.subset(own[:0]))
            shuffled = np.random.default_rng([seed, _HOLDOUT_SALT, k]).permutation(own)
            cut = len(own) - min(share_of(holdout, len(own)), len(own) - 1)
            return ClientData(rows.subset(np.sort(shuffled[:cut])), rows.subset(np.sort(shuffled[cut:])))

        return cls(name, num_clients, make, num_classes, central_test, cache_size=cache_size)


def _check_index(
    offsets: npt.ArrayLike, indices: npt.ArrayLike, num_rows: int, what: str
) -> tuple[npt.NDArray[np.integer], npt.NDArray[np.integer]]:
    """``offsets`` and ``indices`` as integer arrays, after checking that they are a CSR index into the pool."""
    starts, rows = np.asarray(offsets), np.asarray(indices)
    for array, name in ((starts, f"{what}offsets"), (rows, f"{what}indices")):
        if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
            raise ConfigError(f"{name} must be a 1-D integer array, got shape {array.shape} and dtype {array.dtype}")
    rows = rows.astype(np.int64, copy=False) if rows.size == 0 else rows
    if len(starts) < 2:
        raise ConfigError(f"{what}offsets needs at least 2 entries (one client), got {len(starts)}")
    if starts[0] != 0 or starts[-1] != len(rows) or np.any(np.diff(starts) < 0):
        raise ConfigError(
            f"{what}offsets must start at 0, never decrease and end at len({what}indices) = {len(rows)}; "
            f"got {starts[0]} .. {starts[-1]}"
        )
    if len(rows) and (rows.min() < 0 or rows.max() >= num_rows):
        raise ConfigError(
            f"{what}indices must be rows of the pool, in [0, {num_rows}); got {rows.min()} .. {rows.max()}"
        )
    return starts, rows


def partition_index(parts: Sequence[npt.ArrayLike]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The CSR form ``(offsets, indices)`` of one index array per client (what the partitioners return).

    >>> offsets, indices = partition_index([[0, 3], [1], [2, 4, 5]])
    >>> offsets.tolist(), indices.tolist()
    ([0, 2, 3, 6], [0, 3, 1, 2, 4, 5])
    """
    arrays = [np.asarray(part, dtype=np.int64).reshape(-1) for part in parts]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    indices = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    return offsets, indices


def digits_population(
    num_clients: int,
    seed: int = 0,
    *,
    alpha: float = 0.5,
    mean_size: float = 20.0,
    size_sigma: float = 0.5,
    holdout: float = 0.2,
    cache_size: int = DEFAULT_CACHE_SIZE,
) -> LazyFederation:
    """A cross-device population of ``num_clients`` phones, each holding a few handwritten digits.

    Client ``k`` draws, from its own stream (``seed`` and ``k``): a label distribution ``p ~ Dirichlet(alpha)``
    over the 10 digits (small ``alpha``: few digits per client); a size ``n``, log-normal with mean
    ``mean_size`` and log-standard-deviation ``size_sigma`` (0: exactly ``mean_size``), rounded, at least 2;
    then ``n`` labels from ``p`` and, for each, a uniformly chosen row of that digit from the digits training
    pool (:func:`~fedloom.data.load_digits` with its default split). Rows repeat across clients: the pool has
    1,437 rows. The last ``floor(holdout * n)`` rows (at most ``n - 1``) are the client's test split.
    ``central_test`` is the digits test split (360 rows). Nothing is materialized until a client is looked up.

    Raises :class:`ConfigError` for ``num_clients < 1``, a negative ``seed``, ``alpha <= 0``,
    ``mean_size < 2``, a negative ``size_sigma`` or a ``holdout`` outside ``[0, 1)``.
    """
    num_clients = _whole(num_clients, "num_clients", 1)
    seed = _whole(seed, "seed", 0)
    ranges: tuple[tuple[float, str, Callable[[float], bool]], ...] = (
        (alpha, "alpha", lambda v: v > 0),
        (mean_size, "mean_size", lambda v: v >= 2),
        (size_sigma, "size_sigma", lambda v: v >= 0),
        (holdout, "holdout", lambda v: 0 <= v < 1),
    )
    for value, name, ok in ranges:
        if (number := finite_float(value)) is None or not ok(number):
            raise ConfigError(f"{name} out of range: {value!r} (see digits_population's docstring)")
    from fedloom.data.datasets.digits import load_digits

    dataset = load_digits()
    pool = dataset.train
    # Pool rows grouped by label: the rows of label c are by_label[starts[c] : starts[c] + counts[c]].
    by_label = np.argsort(pool.y, kind="stable")
    counts = np.bincount(pool.y.astype(np.int64), minlength=dataset.num_classes)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    concentration = np.full(dataset.num_classes, float(alpha))
    log_mean = math.log(mean_size) - size_sigma**2 / 2  # so that E[size] = mean_size before rounding

    def make_client(k: int, rng: np.random.Generator) -> ClientData:
        p = rng.dirichlet(concentration)
        n = max(2, round(float(rng.lognormal(log_mean, size_sigma))))
        labels = rng.choice(len(p), size=n, p=p)
        rows = by_label[starts[labels] + (rng.random(n) * counts[labels]).astype(np.int64)]
        cut = n - min(share_of(holdout, n), n - 1)
        return ClientData(pool.subset(rows[:cut]), pool.subset(rows[cut:]))

    return LazyFederation.from_generator(
        "digits-population",
        num_clients,
        make_client,
        dataset.num_classes,
        central_test=dataset.test,
        seed=seed,
        cache_size=cache_size,
    )
