"""CKKS aggregation (fedloom.privacy.ckks, TenSEAL): the sum of encrypted updates decrypts to the plain sum within
CKKS's approximation and the key holder's rounding; the server's context cannot decrypt."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tenseal", reason="CKKS is the optional extra fedloom[ckks]")

from fedloom.core.errors import ConfigError, InvalidUpdateError
from fedloom.privacy import ckks


@pytest.fixture(scope="module")
def keys() -> ckks.CKKSKeys:
    return ckks.CKKSKeys.generate()


def test_the_decrypted_sum_is_the_plain_sum_within_the_rounding(keys):
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 0.01, 10_000) for _ in range(5)]  # 3 CKKS vectors each: 4096 + 4096 + 1808
    arrays = [ckks.encrypt(u, keys.public) for u in updates]
    total = ckks.add(arrays, keys.public)
    assert ckks.count_of(total) == 5
    summed = ckks.decrypt_sum(total, keys, round_to=1e-6)
    error = np.abs(summed - np.sum(updates, axis=0))
    assert error.max() <= 0.5e-6 + 1e-7  # half the rounding step, plus CKKS's own error (about 1e-8 here)
    assert np.allclose(summed / 1e-6, np.round(summed / 1e-6))  # what leaves the key holder is rounded
    # A sum of sums counts every update.
    assert ckks.count_of(ckks.add([total, arrays[0]], keys.public)) == 6


def test_the_server_holds_no_secret_and_another_context_is_refused(keys):
    assert not keys.public.load().is_private()
    array = ckks.encrypt(np.ones(3), keys.public)
    other = ckks.CKKSKeys.generate()
    with pytest.raises(ckks.CKKSError, match="another context"):
        ckks.decrypt_sum(array, other)
    with pytest.raises(ckks.CKKSError, match="another context"):
        ckks.add([array, ckks.encrypt(np.ones(3), other.public)], keys.public)
    with pytest.raises(ConfigError, match="must not hold the secret key"):
        ckks.CKKSPublic(keys.context).load()


def test_bad_input_is_refused(keys):
    with pytest.raises(InvalidUpdateError):
        ckks.encrypt(np.array([1.0, np.nan]), keys.public)
    with pytest.raises(ckks.CKKSError, match="flat uint8"):
        ckks.decrypt_sum(np.zeros(3), keys)
    array = ckks.encrypt(np.ones(5000), keys.public)
    with pytest.raises(ckks.CKKSError):
        ckks.add([array[:-10]], keys.public)
    with pytest.raises(ConfigError, match="nothing to add"):
        ckks.add([], keys.public)
