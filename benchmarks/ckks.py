"""CKKS (TenSEAL) against Paillier for additive aggregation: seconds, bytes and error on the same updates.

    python benchmarks/ckks.py [--clients 10] [--params 10000] [--key-bits 2048]

Both run one round in memory: each client encrypts its update (normal, standard deviation 0.01, seed k) to the
uint8 array a message would carry, the server adds the arrays with the public key or context only, and a key
holder decrypts the sum. Paillier packs fixed-point levels (clip 0.1) 63 to a 2048-bit ciphertext
(:mod:`fedloom.privacy.paillier`); CKKS packs 4,096 reals to a vector at scale 2**40 (:mod:`fedloom.privacy.ckks`,
sums rounded to 1e-6 by the key holder). Plain aggregation, in the same run, sums the float32 updates.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedloom.privacy import ckks, paillier
from fedloom.privacy.quantize import Quantizer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--params", type=int, default=10_000)
    parser.add_argument("--key-bits", type=int, default=2048)
    args = parser.parse_args(argv)
    print("$ python benchmarks/ckks.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    updates = [np.random.default_rng(k).normal(0, 0.01, args.params).astype(np.float32) for k in range(args.clients)]
    started = time.perf_counter()
    exact = np.sum([u.astype(np.float64) for u in updates], axis=0)  # plain aggregation, timed as the reference
    plain_seconds = time.perf_counter() - started

    quantizer = Quantizer(clip=0.1, clients=args.clients)
    pkeys = paillier.KeyPair.generate(args.key_bits)
    rows = {
        "Paillier": _measure(
            updates,
            encrypt=lambda u: paillier.encrypt(u, pkeys.public, quantizer).to_array(),
            add=lambda arrays: paillier.add(
                [paillier.EncryptedVector.from_array(a) for a in arrays], pkeys.public, quantizer
            ).to_array(),
            decrypt=lambda a: paillier.decrypt_sum(paillier.EncryptedVector.from_array(a), pkeys, quantizer),
        ),
    }
    ckeys = ckks.CKKSKeys.generate()
    rows["CKKS"] = _measure(
        updates,
        encrypt=lambda u: ckks.encrypt(u, ckeys.public),
        add=lambda arrays: ckks.add(arrays, ckeys.public),
        decrypt=lambda a: ckks.decrypt_sum(a, ckeys),
    )
    print(f"\n{args.clients} clients x {args.params:,} parameters; plain aggregation {plain_seconds:.5f} s\n")
    print(
        "| | client s (encrypt) | server s (add) | key holder s (decrypt) | bytes / client | vs float32 | max error |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (client, server, holder, nbytes, summed) in rows.items():
        error = float(np.abs(summed - exact).max())
        print(
            f"| {name} | {client:.3f} | {server:.3f} | {holder:.3f} | {nbytes:,} | {nbytes / (4 * args.params):.1f}x "
            f"| {error:.1e} |"
        )
    print(f"| plain | 0 | {plain_seconds:.5f} | 0 | {4 * args.params:,} | 1.0x | 0 |")
    print(f"\nCKKS public context (sent to the server once): {len(ckeys.public.context):,} bytes")
    return 0


def _measure(
    updates: list[np.ndarray],
    *,
    encrypt: Callable[[np.ndarray], np.ndarray],
    add: Callable[[list[np.ndarray]], np.ndarray],
    decrypt: Callable[[np.ndarray], Any],
) -> tuple[float, float, float, int, np.ndarray]:
    started = time.perf_counter()
    arrays = [encrypt(u) for u in updates]
    client = (time.perf_counter() - started) / len(updates)
    started = time.perf_counter()
    total = add(arrays)
    server = time.perf_counter() - started
    started = time.perf_counter()
    summed = np.asarray(decrypt(total), np.float64)
    holder = time.perf_counter() - started
    return client, server, holder, int(arrays[0].nbytes), summed


if __name__ == "__main__":
    raise SystemExit(main())
