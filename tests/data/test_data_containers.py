import numpy as np
import pytest

from fedloom.core import DataError
from fedloom.data import ArrayData, Dataset

X = np.zeros((4, 3), np.float32)
Y = np.array([0, 1, 2, 1])


def test_array_data_takes_lists_and_checks_lengths():
    data = ArrayData([[1.0], [2.0]], [0, 1])
    assert isinstance(data.x, np.ndarray)
    np.testing.assert_array_equal(data.subset(np.array([1])).y, [1])
    with pytest.raises(DataError, match="x has 4 rows but y has 3"):
        ArrayData(X, Y[:3])
    with pytest.raises(DataError, match="y must be 1-D"):
        ArrayData(X, Y.reshape(2, 2))


@pytest.mark.parametrize(
    ("train_y", "test_x", "num_classes", "message"),
    [
        (Y.astype(np.float64), X, 3, "train labels must be integer class ids, got dtype float64"),
        (Y, X, 2, r"train labels must lie in \[0, 2\), got \[0, 2\]"),
        (Y - 1, X, 3, r"train labels must lie in \[0, 3\), got \[-1, 1\]"),
        (Y, np.zeros((4, 5), np.float32), 3, r"train examples have shape \(3,\) but test examples \(5,\)"),
        (Y, X, 0, "num_classes must be a whole number >= 1"),
    ],
)
def test_dataset_refuses_inconsistent_data(train_y, test_x, num_classes, message):
    with pytest.raises(DataError, match=message):
        Dataset("toy", ArrayData(X, train_y), ArrayData(test_x, np.zeros(4, np.int64)), num_classes)


def test_from_groups_numbers_groups_in_order():
    a = (ArrayData(np.zeros((2, 3)), np.array([0, 1])), ArrayData(np.zeros((1, 3)), np.array([1])))
    b = (ArrayData(np.ones((3, 3)), np.array([2, 2, 0])), ArrayData(np.ones((2, 3)), np.array([0, 2])))
    dataset = Dataset.from_groups("toy", [a, b], num_classes=3, group_names=("a", "b"))
    np.testing.assert_array_equal(dataset.train.y, [0, 1, 2, 2, 0])
    np.testing.assert_array_equal(dataset.train_groups, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(dataset.test_groups, [0, 1, 1])
    np.testing.assert_array_equal(dataset.test.x[:, 0], [0, 1, 1])
    assert dataset.group_names == ("a", "b")
