"""scikit-learn's bundled 8x8 digits: 1,797 images, 10 classes, no download, good for fast examples and tests."""

from __future__ import annotations

import numpy as np

from fedloom.core.errors import ConfigError
from fedloom.data.base import ArrayData, Dataset

__all__ = ["load_digits"]


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The digits as a :class:`Dataset` named ``"digits"`` with 10 classes (no natural groups).

    The split is stratified by class (``train_test_split`` with ``random_state=seed``). Features are the 64
    pixel values standardized with the train split's per-column mean and std (a constant column, such as an
    always-blank corner pixel, is only centred), so no statistic of the test split leaks into training.

    Returns:
        ``x`` float32 of shape ``(n, 64)``, ``y`` int64.

    Raises:
        ConfigError: ``test_fraction`` is not strictly between 0 and 1.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    # scikit-learn is imported here, not at module level: it takes over a second, and most commands never need it.
    from sklearn.datasets import load_digits as _sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = _sklearn_digits()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0
    return Dataset(
        name="digits",
        train=ArrayData(((x_train - mean) / std).astype(np.float32), y_train),
        test=ArrayData(((x_test - mean) / std).astype(np.float32), y_test),
        num_classes=10,
    )
