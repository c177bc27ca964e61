"""Paillier aggregation's cost: client, server and key-holder seconds and bytes per client, against plain aggregation.

    python benchmarks/paillier.py [--clients 10] [--params 10000] [--key-bits 2048] [--clip 0.1] [--sample 100]

One round of :mod:`fedloom.privacy.paillier` over in-memory message passing: every client encrypts its update
(normal, standard deviation 0.01, float32, seed 0) and serializes it to the uint8 array a message would carry;
the server reads the arrays and adds them with the public key; the key holder decrypts the sum. Client seconds
are one client's encryption and serialization (the mean over clients); bytes per client are its encrypted array,
against sending its update as float32 (the sum the key holder gets back is one more such array). The error is
against the float64 sum of the clipped float32 updates, with the quantizer's stated bound. Plain aggregation, in
the same run, is summing the float32 updates in float64.

Without packing each coordinate would be its own ciphertext; that column is estimated from ``--sample``
coordinates encrypted, added and decrypted one by one with phe, scaled to ``--params``, because measuring it in
full takes about 60 times as long as the packed run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence

import numpy as np
import phe
from phe import paillier as phe_paillier

from fedloom.privacy.paillier import EncryptedVector, KeyPair, add, decrypt_sum, encrypt
from fedloom.privacy.quantize import Quantizer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--params", type=int, default=10_000)
    parser.add_argument("--key-bits", type=int, default=2048)
    parser.add_argument("--clip", type=float, default=0.1, help="quantizer clip (10 standard deviations)")
    parser.add_argument("--sample", type=int, default=100, help="coordinates to time without packing (0: skip)")
    args = parser.parse_args(argv)
    print("$ python benchmarks/paillier.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(
        f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}, "
        f"phe {phe.__version__} ({'with' if phe.util.HAVE_GMP else 'without'} gmpy2)"
    )
    n, length = args.clients, args.params
    rng = np.random.default_rng(0)
    updates = [(rng.standard_normal(length) * 0.01).astype(np.float32) for _ in range(n)]

    began = time.perf_counter()
    plain = np.zeros(length, np.float64)
    for update in updates:
        plain += update
    plain_seconds = time.perf_counter() - began

    began = time.perf_counter()
    keys = KeyPair.generate(args.key_bits)
    keygen_seconds = time.perf_counter() - began
    quantizer = Quantizer(clip=args.clip, clients=n)

    client_seconds = []
    arrays = []
    for update in updates:
        began = time.perf_counter()
        arrays.append(encrypt(update, keys.public, quantizer).to_array())
        client_seconds.append(time.perf_counter() - began)
    began = time.perf_counter()
    total = add([EncryptedVector.from_array(a) for a in arrays], keys.public, quantizer).to_array()
    server_seconds = time.perf_counter() - began
    began = time.perf_counter()
    result = decrypt_sum(EncryptedVector.from_array(total), keys, quantizer)
    holder_seconds = time.perf_counter() - began

    clipped = np.sum(np.clip(np.asarray(updates, np.float64), -args.clip, args.clip), axis=0)
    error = float(np.max(np.abs(result - clipped)))
    vector = EncryptedVector.from_array(arrays[0])
    per_client = float(np.mean(client_seconds))
    packed_bytes = arrays[0].nbytes
    plain_bytes = 4 * length
    width = (2 * keys.public.bits + 7) // 8

    print(
        f"Paillier: {n} clients x {length:,} params, {keys.public.bits}-bit key (made in {keygen_seconds:.1f} s), "
        f"clip {args.clip}, {quantizer.bits}-bit levels in {vector.slot_bits}-bit slots, {vector.slots} per "
        f"ciphertext, {len(vector.ciphertexts)} ciphertexts per client"
    )
    rows = [
        ("client seconds (encrypt, per client)", per_client, 0.0),
        ("server seconds (add)", server_seconds, plain_seconds),
        ("key-holder seconds (decrypt the sum)", holder_seconds, 0.0),
    ]
    unpacked: list[float] = []
    if args.sample > 0:
        unpacked = estimate_unpacked(keys, quantizer, updates, min(args.sample, length), length)
        print(f"without packing: estimated from {min(args.sample, length)} coordinates one per ciphertext")
    print()
    print("| | Paillier, packed | one coordinate per ciphertext (est.) | unpacked / packed | plain | packed / plain |")
    print("|---|---:|---:|---:|---:|---:|")
    for (label, seconds, plain_value), other in zip(rows, unpacked or [float("nan")] * 3, strict=True):
        against = f"{seconds / plain_value:,.0f}x" if plain_value else "-"
        plain_text = f"{plain_value:.5f}" if plain_value else "0"
        print(f"| {label} | {seconds:.3f} | {other:.1f} | {other / seconds:.0f}x | {plain_text} | {against} |")
    unpacked_bytes = length * width
    print(
        f"| bytes per client | {packed_bytes:,} | {unpacked_bytes:,} | {unpacked_bytes / packed_bytes:.0f}x "
        f"| {plain_bytes:,} | {packed_bytes / plain_bytes:.2f}x |"
    )
    print(f"| max error of the sum (bound {quantizer.bound(n):.2e}) | {error:.2e} | | | 0 | |")
    print()
    print(f"within the bound: {error <= quantizer.bound(n)}")
    return 0


def estimate_unpacked(
    keys: KeyPair, quantizer: Quantizer, updates: list[np.ndarray], sample: int, length: int
) -> list[float]:
    """Client, server and key-holder seconds for ``length`` coordinates one per ciphertext, from ``sample`` of them
    encrypted, added and decrypted with phe directly."""
    public = phe_paillier.PaillierPublicKey(keys.public.n)
    private = phe_paillier.PaillierPrivateKey(public, keys.p, keys.q)
    levels = [quantizer.encode(u[:sample]).tolist() for u in updates]
    began = time.perf_counter()
    encrypted = [[public.encrypt(v) for v in row] for row in levels]
    encrypt_seconds = (time.perf_counter() - began) / len(updates)
    began = time.perf_counter()
    sums = [sum(column[1:], column[0]) for column in zip(*encrypted, strict=True)]
    add_seconds = time.perf_counter() - began
    began = time.perf_counter()
    decrypted = [private.decrypt(s) for s in sums]
    decrypt_seconds = time.perf_counter() - began
    assert decrypted == [sum(column) for column in zip(*levels, strict=True)]
    scale = length / sample
    return [encrypt_seconds * scale, add_seconds * scale, decrypt_seconds * scale]


if __name__ == "__main__":
    sys.exit(main())
