"""Strict JSON and finite numbers: the one home of what the run store, the ledger, telemetry and the dashboard
write and check."""

import enum
import json
import math
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from fedloom.core.errors import ConfigError
from fedloom.core.strictjson import finite_float, finite_number, jsonable, strict_dumps


@pytest.mark.parametrize(
    ("value", "as_float", "is_number"),
    [
        (1, 1.0, True),
        (0.25, 0.25, True),
        (np.float64(0.5), 0.5, True),  # a float subclass
        (np.float32(0.5), 0.5, False),  # a real number, but not what a row or a JSON document holds
        (np.int64(3), 3.0, False),
        (True, None, False),
        (math.nan, None, False),
        (-math.inf, None, False),
        (np.float32("inf"), None, False),
        ("1.5", None, False),
        (None, None, False),
    ],
)
def test_finite_numbers(value, as_float, is_number):
    assert finite_float(value) == as_float
    assert finite_number(value) is is_number


class Colour(enum.Enum):
    RED = "red"


@dataclass
class Point:
    x: float
    where: Path


def test_jsonable_turns_what_fedloom_keeps_into_plain_json():
    value = {
        "nan": math.nan,
        "array": np.arange(3),
        "scalar": np.float32(1.5),
        "colour": Colour.RED,
        "day": date(2025, 1, 2),
        "point": Point(math.inf, Path("a/b")),
        7: (1, 2),
    }
    assert jsonable(value) == {
        "nan": None,
        "array": [0, 1, 2],
        "scalar": 1.5,
        "colour": "red",
        "day": "2025-01-02",
        "point": {"x": None, "where": "a/b"},
        "7": [1, 2],
    }
    with pytest.raises(ConfigError, match="cannot store a set"):
        jsonable({1, 2})
    with pytest.raises(ConfigError, match="keys must be strings"):
        jsonable({(1, 2): 3})


def test_strict_dumps_is_jsons_own_without_nan():
    value = {"b": [1.5, None], "a": {"c": "é"}}
    for options in ({}, {"indent": 2}, {"sort_keys": True}):
        assert strict_dumps(value, **options) == json.dumps(value, **options)
    compact = json.dumps(value, sort_keys=True, separators=(",", ":"))
    assert strict_dumps(value, sort_keys=True, compact=True) == compact
    with pytest.raises(ValueError, match="not JSON compliant"):
        strict_dumps({"loss": math.nan})
