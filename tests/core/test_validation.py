import numpy as np
import pytest

from fedloom.core import InvalidUpdateError, Params, check_update

REFERENCE = Params({"w": np.zeros((2, 3), np.float32), "n": np.array(0, np.int64)})


def test_a_matching_finite_update_passes():
    check_update(REFERENCE, Params({"w": np.ones((2, 3), np.float32), "n": np.array(5, np.int64)}))


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"w": np.zeros((2, 3), np.float32)}, r"missing \['n'\]"),
        ({"n": np.array(0, np.int64), "w": np.zeros((2, 3), np.float32)}, "another order"),
        (
            {"w": np.zeros((3, 2), np.float32), "n": np.array(0, np.int64)},
            r"'w' is float32\[3, 2\], expected float32\[2, 3\]",
        ),
        ({"w": np.zeros((2, 3), np.float64), "n": np.array(0, np.int64)}, "expected float32"),
        ({"w": np.full((2, 3), np.inf, np.float32), "n": np.array(0, np.int64)}, "NaN or infinite"),
        ({"w": np.zeros((2, 3), np.float32), "n": np.array(0, np.int64), "x": np.zeros(1)}, r"unexpected \['x'\]"),
    ],
)
def test_bad_updates_are_refused_with_a_reason(update, message):
    with pytest.raises(InvalidUpdateError, match=message):
        check_update(REFERENCE, Params(update))


@pytest.mark.parametrize("where", [0, (1 << 20) - 1, 1 << 20, 3 * (1 << 20) + 5])
def test_a_nan_anywhere_in_a_large_array_is_found(where):
    reference = Params({"w": np.zeros(3 * (1 << 20) + 6, np.float32)})  # past several blocks of the check
    values = np.zeros(3 * (1 << 20) + 6, np.float32)
    check_update(reference, Params({"w": values}))
    values[where] = np.nan
    with pytest.raises(InvalidUpdateError, match="NaN or infinite"):
        check_update(reference, Params({"w": values}))
