"""Paillier aggregation with real cryptography (phe, 1024-bit keys for speed): sums within the quantization bound,
the packing at its boundaries, carries refused, and what the server and a wrong key cannot do."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from phe import paillier as phe

from fedloom.core.codec import decode_message, encode_message
from fedloom.core.errors import ConfigError, InvalidUpdateError
from fedloom.core.message import Message
from fedloom.core.params import Params
from fedloom.privacy.paillier import (
    EncryptedVector,
    KeyPair,
    PaillierError,
    PublicKey,
    _pack,
    add,
    decrypt_sum,
    encrypt,
)
from fedloom.privacy.quantize import Quantizer


@pytest.fixture(scope="module")
def keys() -> KeyPair:
    return KeyPair.generate(1024)


@pytest.fixture(scope="module")
def other_keys() -> KeyPair:
    return KeyPair.generate(1024)


def aggregate(updates, keys: KeyPair, quantizer: Quantizer) -> np.ndarray:
    """Every client encrypts, the server adds with the public key only, the key holder decrypts the sum."""
    sent = [EncryptedVector.from_array(encrypt(u, keys.public, quantizer).to_array()) for u in updates]
    total = add(sent, PublicKey.from_bytes(keys.public.to_bytes()), quantizer)
    return decrypt_sum(EncryptedVector.from_array(total.to_array()), keys, quantizer)


def test_a_three_client_sum_worked_by_hand(keys):
    # clip 1, bits 2: levels 0..3, step 2/3, level = rint(1.5 (x + 1)); slots of 4 bits (3 clients x 3 = 9 < 16).
    quantizer = Quantizer(clip=1.0, clients=3, bits=2)
    a = [-1.0, 0.1, 1.0, 0.3]  # levels 0, 2, 3, 2 (1.65 -> 2, 1.95 -> 2)
    b = [-0.5, 0.2, 1.0, -0.9]  # levels 1, 2, 3, 0 (0.75 -> 1, 1.8 -> 2, 0.15 -> 0)
    c = [2.0, -0.2, 1.0, 0.9]  # levels 3, 1, 3, 3 (2.0 is clipped to 1; 1.2 -> 1, 2.85 -> 3)
    # level sums 4, 5, 9, 5 decode to sum * 2/3 - 3 clip
    np.testing.assert_allclose(aggregate([a, b, c], keys, quantizer), [-1 / 3, 1 / 3, 3.0, 1 / 3], atol=1e-12)
    # client a's plaintext, slot 0 in the lowest bits: 0 | 2 << 4 | 3 << 8 | 2 << 12
    assert _pack(quantizer.encode(np.array(a)), 4) == 0x2320
    vector = encrypt(a, keys.public, quantizer)
    assert (vector.slot_bits, vector.slots, len(vector.ciphertexts)) == (4, 255, 1)
    assert keys._phe.raw_decrypt(vector.ciphertexts[0]) == 0x2320


def test_ten_clients_sum_to_the_plain_sum_within_the_bound(keys):
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 0.3, 300).astype(np.float32) for _ in range(10)]
    plain = np.sum(np.clip(np.asarray(updates, np.float64), -1, 1), axis=0)
    fine = Quantizer(clip=1.0, clients=10)  # 28 bits, 32-bit slots
    error = np.max(np.abs(aggregate(updates, keys, fine) - plain))
    assert error <= fine.bound(10) < 1e-7
    coarse = Quantizer(clip=1.0, clients=10, bits=8)  # 12-bit slots, 84 to a 1024-bit ciphertext
    error = np.max(np.abs(aggregate(updates, keys, coarse) - plain))
    assert coarse.bound(10) / 10 < error <= coarse.bound(10)  # the bound is what the rounding can cost


@pytest.mark.parametrize("length", [1, 30, 31, 32, 62, 63])
def test_the_packing_round_trips_at_slot_and_ciphertext_boundaries(keys, length):
    quantizer = Quantizer(clip=0.5, clients=4)  # 30 bits, 32-bit slots, 31 to a 1024-bit ciphertext
    pattern = np.resize([-0.5, 0.5, 0.0, -0.25, 0.125, -0.7, 0.7], length)
    updates = [pattern, -pattern, np.full(length, 0.5), np.full(length, -0.5)]
    total = aggregate(updates, keys, quantizer)
    assert total.shape == (length,)
    assert total.dtype == np.float64
    assert np.max(np.abs(total - np.sum(np.clip(updates, -0.5, 0.5), axis=0))) <= quantizer.bound(4)
    assert len(encrypt(pattern, keys.public, quantizer).ciphertexts) == -(-length // 31)


def test_full_slots_do_not_carry(keys):
    quantizer = Quantizer(clip=1.0, clients=5)  # 5 x (2**29 - 1) fills 32-bit slots to 2**31.3
    np.testing.assert_allclose(aggregate([np.ones(40)] * 5, keys, quantizer), 5.0, atol=1e-12)
    np.testing.assert_allclose(aggregate([-np.ones(40)] * 5, keys, quantizer), -5.0, atol=1e-12)
    mixed = [np.tile([1.0, -1.0], 20)] * 5
    np.testing.assert_allclose(aggregate(mixed, keys, quantizer), np.tile([5.0, -5.0], 20), atol=1e-12)


def test_sums_that_could_carry_are_refused(keys):
    quantizer = Quantizer(clip=1.0, clients=2)  # 31 bits: three clients would carry out of a 32-bit slot
    vectors = [encrypt(np.ones(10), keys.public, quantizer) for _ in range(3)]
    with pytest.raises(PaillierError, match="could carry"):
        add(vectors, keys.public, quantizer)
    total = add(vectors[:2], keys.public, quantizer)
    with pytest.raises(PaillierError, match="could carry"):
        decrypt_sum(dataclasses.replace(total, count=3), keys, quantizer)
    with pytest.raises(PaillierError, match="a sum of 1 packed updates"):  # a count below the truth
        decrypt_sum(dataclasses.replace(total, count=1), keys, quantizer)


def test_the_server_holds_no_private_key_and_sees_randomized_ciphertexts(keys):
    quantizer = Quantizer(clip=1.0, clients=3)
    public = PublicKey.from_bytes(keys.public.to_bytes())
    assert [f.name for f in dataclasses.fields(public)] == ["n", "_phe"]
    assert isinstance(public._phe, phe.PaillierPublicKey)
    assert not isinstance(public._phe, phe.PaillierPrivateKey)
    assert not hasattr(public._phe, "p")
    assert str(keys.p) not in repr(keys)
    assert str(keys.q) not in repr(keys)
    same = [encrypt(np.zeros(5), public, quantizer) for _ in range(2)]
    assert same[0].ciphertexts != same[1].ciphertexts  # equal updates do not look equal
    with pytest.raises(ConfigError, match="PublicKey"):
        add(same, keys, quantizer)


def test_a_wrong_key_is_detected(keys, other_keys):
    quantizer = Quantizer(clip=1.0, clients=3)
    vector = encrypt(np.linspace(-1, 1, 50), keys.public, quantizer)
    with pytest.raises(PaillierError, match="encrypted under key"):
        decrypt_sum(vector, other_keys, quantizer)
    with pytest.raises(PaillierError, match="encrypted under key"):
        add([vector, encrypt(np.zeros(50), other_keys.public, quantizer)], keys.public, quantizer)
    # a vector that claims the other key decrypts to noise, which no sum of packed updates can be
    forged = dataclasses.replace(vector, key=other_keys.public.fingerprint)
    forged = dataclasses.replace(forged, ciphertexts=tuple(c % other_keys.public.n**2 for c in forged.ciphertexts))
    with pytest.raises(PaillierError, match="another key"):
        decrypt_sum(forged, other_keys, quantizer)


def test_vectors_that_do_not_fit_are_refused(keys):
    quantizer = Quantizer(clip=1.0, clients=3)
    vector = encrypt(np.zeros(40), keys.public, quantizer)
    with pytest.raises(PaillierError, match="slots"):
        decrypt_sum(vector, keys, Quantizer(clip=1.0, clients=3, bits=8))
    with pytest.raises(PaillierError, match="different lengths"):
        add([vector, encrypt(np.zeros(41), keys.public, quantizer)], keys.public, quantizer)
    with pytest.raises(PaillierError, match="ciphertexts for"):
        dataclasses.replace(vector, ciphertexts=vector.ciphertexts[:1])
    with pytest.raises(PaillierError, match="out of range"):
        dataclasses.replace(vector, ciphertexts=(0, *vector.ciphertexts[1:]))
    with pytest.raises(InvalidUpdateError):
        encrypt([0.0, np.nan], keys.public, quantizer)
    with pytest.raises(ConfigError):
        encrypt([0.0], keys.public, object())


def test_encrypted_vectors_travel_in_a_message(keys):
    quantizer = Quantizer(clip=1.0, clients=3)
    vector = encrypt(np.linspace(-1, 1, 70), keys.public, quantizer)
    array = vector.to_array()
    assert array.dtype == np.uint8
    assert array.ndim == 1
    assert array.nbytes == 25 + 3 * 256  # a 25-byte header, then 3 ciphertexts below n**2 < 2**2048
    message = decode_message(encode_message(Message("paillier.update", Params({"sum": array}))))
    assert EncryptedVector.from_array(np.asarray(message.params["sum"])) == vector
    for broken in (array[:-1], array[:10], np.concatenate([[0], array[1:]]).astype(np.uint8), array.astype(np.int8)):
        with pytest.raises(PaillierError):
            EncryptedVector.from_array(broken)


def test_keys_round_trip_and_bad_keys_are_refused(keys):
    assert KeyPair.from_bytes(keys.to_bytes()) == keys
    assert PublicKey.from_bytes(keys.public.to_bytes()) == keys.public
    assert keys.public.bits == 1024
    assert len(keys.public.fingerprint) == 8
    for bits in (512, 1025, 2047):
        with pytest.raises(ConfigError):
            KeyPair.generate(bits)
    with pytest.raises(ConfigError):
        KeyPair.from_bytes(keys.to_bytes()[:-1])
    with pytest.raises(ConfigError):
        PublicKey(2**1024)  # even
