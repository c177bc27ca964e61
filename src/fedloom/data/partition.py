"""Partitioners: how a centralized training set is split over simulated clients.

Every partitioner is a pure function of its arguments and a :class:`numpy.random.Generator`, and returns one
``int64`` array of sample indices per client, each sorted ascending. Together the arrays assign every index
``0 .. n-1`` to exactly one client, and no client is empty. Invalid arguments raise
:class:`~fedloom.core.errors.ConfigError` with a message that says what to change.

>>> rng = np.random.default_rng(0)
>>> [len(p) for p in iid(10, 3, rng)]
[4, 3, 3]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from fedloom.core.config import PartitionConfig
from fedloom.core.errors import ConfigError

__all__ = ["dirichlet", "iid", "label_histogram", "natural", "partition", "quantity_skew", "shards"]

Parts = list[npt.NDArray[np.int64]]


# -- argument checks ----------------------------------------------------------------------------------------


def _check_count(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ConfigError(f"alpha must be a number, got {alpha!r}")
    value = float(alpha)
    if math.isnan(value) or math.isinf(value):
        raise ConfigError(f"alpha must be a finite number > 0, got {value}")
    if value <= 0:
        raise ConfigError(f"alpha must be > 0, got {value}")
    return value


def _check_rng(rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(
            f"rng must be a numpy.random.Generator (e.g. np.random.default_rng(seed)), got {type(rng).__name__}"
        )
    return rng


def _check_ids(values: npt.ArrayLike, name: str) -> npt.NDArray[np.int64]:
    """``values`` as a 1-D int64 array of non-negative integers (class labels or group ids)."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ConfigError(f"{name} must be a 1-D array, got shape {array.shape}")
    if array.size and not (np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_):
        raise ConfigError(f"{name} must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.size and array.min() < 0:
        raise ConfigError(f"{name} must be >= 0, got {array.min()}")
    return array


def _check_split(num_samples: int, num_clients: int) -> None:
    if num_samples < num_clients:
        raise ConfigError(f"cannot split {num_samples} samples over {num_clients} clients")


def _check_min_size(num_samples: int, num_clients: int, min_size: int) -> None:
    if num_clients * min_size > num_samples:
        raise ConfigError(
            f"cannot give {num_clients} clients at least {min_size} samples each from only {num_samples} samples"
        )


# -- helpers ------------------------------------------------------------------------------------------------


def _split_sorted(indices: npt.NDArray[np.int64], sizes: Sequence[int] | npt.NDArray[np.int64]) -> Parts:
    """Cut ``indices`` into consecutive pieces of the given sizes, each sorted ascending."""
    cuts = np.cumsum(sizes)[:-1]
    return [np.sort(piece).astype(np.int64, copy=False) for piece in np.split(indices, cuts)]


def _parts_from_owner(owner: npt.NDArray[np.int64], num_clients: int) -> Parts:
    """One sorted index array per client, from ``owner[i]`` = the client that sample ``i`` belongs to."""
    order = np.argsort(owner, kind="stable").astype(np.int64)
    return _split_sorted(order, np.bincount(owner, minlength=num_clients))


def _largest_remainder(total: int, proportions: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """Integers proportional to ``proportions`` that sum to exactly ``total`` (Hamilton's method)."""
    raw = total * proportions / proportions.sum()
    counts: npt.NDArray[np.int64] = np.floor(raw).astype(np.int64)
    short = total - int(counts.sum())
    # The largest fractional parts get one more; a stable sort breaks ties by client order.
    counts[np.argsort(-(raw - counts), kind="stable")[:short]] += 1
    return counts


# -- partitioners -------------------------------------------------------------------------------------------


def iid(num_samples: int, num_clients: int, rng: np.random.Generator) -> Parts:
    """Split ``num_samples`` samples uniformly at random into ``num_clients`` near-equal parts.

    Client sizes differ by at most one (the first ``num_samples % num_clients`` clients get the extra sample).
    This is the IID baseline of McMahan et al. (2017), "Communication-Efficient Learning of Deep Networks
    from Decentralized Data".

    Raises :class:`ConfigError` if ``num_clients < 1`` or ``num_samples < num_clients``.
    """
    num_samples = _check_count(num_samples, "num_samples", minimum=0)
    num_clients = _check_count(num_clients, "num_clients")
    rng = _check_rng(rng)
    _check_split(num_samples, num_clients)
    permutation = rng.permutation(num_samples).astype(np.int64)
    return [np.sort(piece) for piece in np.array_split(permutation, num_clients)]


def dirichlet(
    labels: npt.ArrayLike,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
    max_tries: int = 100,
) -> Parts:
    """Label-skewed split: each class is shared out over clients in Dirichlet(``alpha``) proportions.

    The benchmark of Hsu, Qi and Brown (2019), "Measuring the Effects of Non-Identical Data Distribution for
    Federated Visual Classification", in the per-class form that is commonly used (Yurochkin et al. 2019):
    for every class, draw ``p ~ Dir(alpha * 1_K)`` over the ``K`` clients and cut that class's shuffled
    indices at the cumulative proportions. Small ``alpha`` (0.1) gives each client few classes; large
    ``alpha`` (100) approaches IID. The whole draw is repeated until every client holds at least
    ``min_size`` samples. Where ``max_tries`` draws all leave some client short (many clients over few
    samples: 1,000 clients over digits' 1,437 training rows leave dozens empty in every draw), the last draw
    is topped up: each short client in turn takes random samples from the then-largest client until it holds
    ``min_size``. That moves only ``min_size`` samples per short client, so the label skew of the draw stays;
    the test suite measures it.

    ``labels`` are non-negative integer class ids, one per sample. Raises :class:`ConfigError` on invalid
    arguments (including fewer than ``min_size`` samples per client on average).
    """
    labels = _check_ids(labels, "labels")
    num_clients = _check_count(num_clients, "num_clients")
    alpha = _check_alpha(alpha)
    rng = _check_rng(rng)
    min_size = _check_count(min_size, "min_size")
    max_tries = _check_count(max_tries, "max_tries")
    num_samples = len(labels)
    _check_split(num_samples, num_clients)
    _check_min_size(num_samples, num_clients, min_size)

    by_class = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    concentration = np.full(num_clients, alpha)
    owner = np.empty(num_samples, dtype=np.int64)
    for _ in range(max_tries):
        for members in by_class:
            shuffled = rng.permutation(members)
            proportions = rng.dirichlet(concentration)
            cuts = np.floor(np.cumsum(proportions)[:-1] * len(shuffled)).astype(np.int64)
            counts = np.diff(np.concatenate(([0], np.minimum(cuts, len(shuffled)), [len(shuffled)])))
            owner[shuffled] = np.repeat(np.arange(num_clients, dtype=np.int64), counts)
        if np.bincount(owner, minlength=num_clients).min() >= min_size:
            return _parts_from_owner(owner, num_clients)
    _top_up(owner, num_clients, min_size, rng)
    return _parts_from_owner(owner, num_clients)


def _top_up(owner: npt.NDArray[np.int64], num_clients: int, min_size: int, rng: np.random.Generator) -> None:
    """Give every client at least ``min_size`` samples, each short client taking random samples from the client
    that is largest at that moment (in place; the caller checked that there are enough samples)."""
    sizes = np.bincount(owner, minlength=num_clients)
    for client in np.flatnonzero(sizes < min_size):
        while sizes[client] < min_size:
            donor = int(np.argmax(sizes))
            taken = rng.choice(np.flatnonzero(owner == donor))
            owner[taken] = client
            sizes[donor] -= 1
            sizes[client] += 1


def shards(labels: npt.ArrayLike, num_clients: int, shards_per_client: int, rng: np.random.Generator) -> Parts:
    """Pathological non-IID split: sort by label, cut into shards, deal ``shards_per_client`` to each client.

    McMahan et al. (2017), "Communication-Efficient Learning of Deep Networks from Decentralized Data":
    the samples are sorted by label (ties in a seeded random order), cut into
    ``num_clients * shards_per_client`` contiguous shards of near-equal size, and each client receives
    ``shards_per_client`` shards chosen at random. With 2 shards per client most clients see at most two
    labels.

    Raises :class:`ConfigError` on invalid arguments, or when there are fewer samples than shards.
    """
    labels = _check_ids(labels, "labels")
    num_clients = _check_count(num_clients, "num_clients")
    shards_per_client = _check_count(shards_per_client, "shards_per_client")
    rng = _check_rng(rng)
    num_samples = len(labels)
    num_shards = num_clients * shards_per_client
    if num_shards > num_samples:
        raise ConfigError(
            f"shards: {num_clients} clients x {shards_per_client} shards = {num_shards} shards "
            f"but only {num_samples} samples"
        )
    shuffled = rng.permutation(num_samples).astype(np.int64)
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    # Integer boundaries, so every shard has floor or ceil of num_samples / num_shards samples (never 0).
    shard_sizes = np.diff(np.arange(num_shards + 1, dtype=np.int64) * num_samples // num_shards)
    shard_of_position = np.repeat(np.arange(num_shards, dtype=np.int64), shard_sizes)
    client_of_shard = np.empty(num_shards, dtype=np.int64)
    client_of_shard[rng.permutation(num_shards)] = np.arange(num_shards, dtype=np.int64) // shards_per_client
    owner = np.empty(num_samples, dtype=np.int64)
    owner[by_label] = client_of_shard[shard_of_position]
    return _parts_from_owner(owner, num_clients)


def quantity_skew(
    num_samples: int, num_clients: int, alpha: float, rng: np.random.Generator, min_size: int = 1
) -> Parts:
    """Quantity-skewed split: client sizes follow Dirichlet(``alpha``) proportions, labels stay IID.

    As in Li et al. (2022), "Federated Learning on Non-IID Data Silos: An Experimental Study": draw
    ``q ~ Dir(alpha * 1_K)``; every client first gets ``min_size`` samples and the remaining
    ``num_samples - K * min_size`` are shared in proportion to ``q`` (largest-remainder rounding, so the sizes
    sum exactly to ``num_samples``). Which samples a client gets is a uniform random permutation.

    Raises :class:`ConfigError` on invalid arguments, or when ``num_clients * min_size > num_samples``.
    """
    num_samples = _check_count(num_samples, "num_samples", minimum=0)
    num_clients = _check_count(num_clients, "num_clients")
    alpha = _check_alpha(alpha)
    rng = _check_rng(rng)
    min_size = _check_count(min_size, "min_size")
    _check_split(num_samples, num_clients)
    _check_min_size(num_samples, num_clients, min_size)
    proportions = rng.dirichlet(np.full(num_clients, alpha))
    sizes = min_size + _largest_remainder(num_samples - num_clients * min_size, proportions)
    return _split_sorted(rng.permutation(num_samples).astype(np.int64), sizes)


def natural(groups: npt.ArrayLike) -> Parts:
    """One client per distinct group id in ``groups`` (a hospital, a writer, a device), in ascending id order.

    ``groups`` holds a non-negative integer group id per sample. Ids that do not occur get no client.
    Raises :class:`ConfigError` if ``groups`` is empty or not a 1-D array of non-negative integers.
    """
    groups = _check_ids(groups, "groups")
    if len(groups) == 0:
        raise ConfigError("natural partition needs at least one sample, got none")
    return [np.flatnonzero(groups == g).astype(np.int64) for g in np.unique(groups)]


def label_histogram(parts: Sequence[npt.ArrayLike], labels: npt.ArrayLike, num_classes: int) -> npt.NDArray[np.int64]:
    """How many samples of each class each client holds: an ``int64`` array of shape ``(clients, classes)``.

    Raises :class:`ConfigError` if a label is not in ``[0, num_classes)``.
    """
    labels = _check_ids(labels, "labels")
    num_classes = _check_count(num_classes, "num_classes")
    if labels.size and labels.max() >= num_classes:
        raise ConfigError(f"label {labels.max()} is outside [0, {num_classes})")
    histogram = np.zeros((len(parts), num_classes), dtype=np.int64)
    for row, part in enumerate(parts):
        histogram[row] = np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=num_classes)
    return histogram


def partition(
    labels: npt.ArrayLike,
    num_clients: int,
    config: PartitionConfig,
    rng: np.random.Generator,
    groups: npt.ArrayLike | None = None,
) -> Parts:
    """Split samples with the given ``labels`` over ``num_clients`` clients as ``config.scheme`` says.

    ``natural`` uses ``groups`` (one group id per sample) and requires ``num_clients`` to equal the number of
    distinct groups; the other schemes ignore ``groups``. Raises :class:`ConfigError` as the partitioners do,
    and when ``natural`` is asked for without groups or with another number of clients.
    """
    scheme = config.scheme
    if scheme == "natural":
        if groups is None:
            raise ConfigError("the natural partition needs per-sample group ids; this dataset has no natural clients")
        group_ids = _check_ids(groups, "groups")
        num_labels = len(np.asarray(labels))
        if len(group_ids) != num_labels:
            raise ConfigError(f"groups has {len(group_ids)} entries but there are {num_labels} labels")
        parts = natural(group_ids)
        if num_clients != len(parts):
            raise ConfigError(
                f"the dataset has {len(parts)} natural clients; set num_clients to {len(parts)} "
                f"for the natural partition (got {num_clients})"
            )
        return parts
    if scheme == "iid":
        return iid(len(_check_ids(labels, "labels")), num_clients, rng)
    if scheme == "dirichlet":
        return dirichlet(labels, num_clients, config.alpha, rng)
    if scheme == "shards":
        return shards(labels, num_clients, config.shards_per_client, rng)
    if scheme == "quantity":
        return quantity_skew(len(_check_ids(labels, "labels")), num_clients, config.alpha, rng)
    raise ConfigError(f"unknown partition scheme {scheme!r}")
