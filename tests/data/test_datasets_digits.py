"""scikit-learn's digits: a stratified split standardized with the train split's statistics."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom.core.errors import ConfigError
from fedloom.data.datasets import load_digits


def test_shapes_types_and_split() -> None:
    data = load_digits()
    assert data.name == "digits"
    assert data.num_classes == 10
    assert not data.has_groups
    assert data.train.x.shape == (1437, 64)
    assert data.test.x.shape == (360, 64)
    for split in (data.train, data.test):
        assert split.x.dtype == np.float32
        assert split.y.dtype == np.int64
    # stratified: each class's share of the test split matches its share overall, to within one row
    overall = np.bincount(np.concatenate([data.train.y, data.test.y]), minlength=10)
    assert np.all(np.abs(np.bincount(data.test.y, minlength=10) - overall * 0.2) <= 1)


def test_train_split_is_standardized() -> None:
    x = load_digits().train.x.astype(np.float64)
    std = x.std(axis=0)
    constant = std == 0
    assert constant.any()  # blank corner pixels: centred, not divided by zero
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(std[~constant], 1.0, atol=1e-5)
    assert np.isfinite(load_digits().test.x).all()


def test_seed_decides_the_split() -> None:
    a, b, c = load_digits(seed=5), load_digits(seed=5), load_digits(seed=6)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.test.y, b.test.y)
    assert not np.array_equal(a.test.y, c.test.y)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5])
def test_invalid_test_fraction(fraction: float) -> None:
    with pytest.raises(ConfigError):
        load_digits(test_fraction=fraction)
