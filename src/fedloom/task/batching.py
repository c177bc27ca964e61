"""The order in which local SGD visits a client's examples, shared by every task so that they agree."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from fedloom.core.config import FitConfig
from fedloom.core.errors import DataError

__all__ = ["minibatches"]


def minibatches(num_examples: int, config: FitConfig) -> Iterator[npt.NDArray[np.intp]]:
    """The example indices of each local SGD step, in order.

    One generator, ``np.random.default_rng(config.seed)``, draws a fresh permutation of
    ``range(num_examples)`` per epoch (epoch ``e`` uses its ``e``-th permutation), which is cut into batches
    of ``config.batch_size`` (the last one of an epoch may be smaller). With ``local_epochs=E`` that gives
    ``E * ceil(n / B)`` steps; with ``local_steps=S`` exactly ``S`` steps, reshuffling whenever an epoch runs
    out. Raises :class:`DataError` when there are no examples.

    >>> config = FitConfig(local_epochs=None, local_steps=3, batch_size=2, seed=1)
    >>> [b.tolist() for b in minibatches(3, config)]
    [[0, 1], [2], [2, 0]]
    """
    if num_examples <= 0:
        raise DataError("cannot train on an empty dataset (0 examples)")
    rng = np.random.default_rng(config.seed)
    size = config.batch_size
    remaining = config.local_steps  # None: count epochs instead
    epochs = config.local_epochs
    epoch = 0
    while True:
        if remaining is None and epochs is not None and epoch >= epochs:
            return
        order = rng.permutation(num_examples)
        for start in range(0, num_examples, size):
            if remaining is not None:
                if remaining == 0:
                    return
                remaining -= 1
            yield order[start : start + size]
        epoch += 1
