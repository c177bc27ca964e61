"""``describe``: the JSON description of a job's parts that a run records and a resumed deployment compares."""

from fedloom.app.job import describe
from fedloom.core import FitConfig


class Wrapper:
    """A user's task wrapper: a plain object, whose default repr holds its memory address."""

    def __init__(self, inner: object, seconds: float) -> None:
        self.inner = inner
        self.seconds = seconds
        self._cache = object()


def test_a_plain_object_is_described_by_its_public_attributes_never_its_address():
    first, second = Wrapper(FitConfig(lr=0.5), 2.0), Wrapper(FitConfig(lr=0.5), 2.0)
    assert describe(first) == describe(second)
    assert describe(first) == {"type": "Wrapper", "inner": describe(FitConfig(lr=0.5)), "seconds": 2.0}
    assert describe(Wrapper(FitConfig(lr=0.1), 2.0)) != describe(first)
    assert " at 0x" not in str(describe(first))
