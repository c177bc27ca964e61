"""Secure aggregation's cost: client and server seconds and bytes per client, against plain aggregation.

    python benchmarks/secagg.py [--clients 100] [--params 100000] [--dropout 0.1] [--threshold 0.5] [--degree K]

One round of the protocol core (:mod:`fedloom.privacy.secagg`) over in-memory message passing: every client
advertises keys, shares them, masks its update (random floats in [-1, 1]); ``--dropout`` of the clients drop
after sharing keys (the costly case for the server, which must rebuild their pairwise masks). Client seconds
are one client's own steps (the mean over clients); server seconds are routing, checking and unmasking. Bytes
per client count what one client sends and receives as the protocol carries it (keys, sealed shares, the
masked vector of 32-bit words, the unmasking shares), against sending its update as float32. Plain
aggregation, in the same run, is summing the float32 updates. ``--degree K`` runs SecAgg+ (Bell et al.
2020): each client deals with K neighbours of a random K-regular graph, with the threshold taken of K + 1.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence

import numpy as np

from fedloom.privacy.quantize import Quantizer
from fedloom.privacy.secagg import SecAggClient, SecAggServer, neighbourhoods

SHARE_BYTES = 4 + 66  # a Shamir share as the protocol packs it


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--dropout", type=float, default=0.1, help="share of clients dropping after key sharing")
    parser.add_argument("--threshold", type=float, default=0.5, help="t as a share of the parties each one deals with")
    parser.add_argument("--degree", type=int, default=None, help="SecAgg+: neighbours per client")
    args = parser.parse_args(argv)
    print("$ python benchmarks/secagg.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}")
    n, length = args.clients, args.params
    t = int(args.threshold * (n if args.degree is None else args.degree + 1)) + 1
    rng = np.random.default_rng(0)
    updates = {p: rng.uniform(-1, 1, length).astype(np.float32) for p in range(1, n + 1)}
    dropped = set(range(1, int(args.dropout * n) + 1))

    started = time.perf_counter()
    plain = np.zeros(length, np.float64)
    for p, update in updates.items():
        if p not in dropped:
            plain += update
    plain_seconds = time.perf_counter() - started

    quantizer = Quantizer(clip=1.0, clients=n)
    client_seconds: dict[int, float] = dict.fromkeys(updates, 0.0)
    sent: dict[int, int] = dict.fromkeys(updates, 0)
    received: dict[int, int] = dict.fromkeys(updates, 0)

    def timed(party: int, step, *step_args):
        began = time.perf_counter()
        out = step(*step_args)
        client_seconds[party] += time.perf_counter() - began
        return out

    clients = {p: SecAggClient(p, t, quantizer) for p in updates}
    near = None if args.degree is None else neighbourhoods(sorted(updates), args.degree, np.random.default_rng(1))
    server = SecAggServer(t, quantizer, length, near)
    server_seconds = 0.0
    adverts = {p: timed(p, c.advertise) for p, c in clients.items()}
    for p in adverts:
        sent[p] += 64
    began = time.perf_counter()
    roster = server.collect_keys(adverts)
    server_seconds += time.perf_counter() - began
    del roster
    rosters = {p: server.roster_for(p) for p in clients}
    for p in clients:
        received[p] += 64 * len(rosters[p])
    boxes = {p: timed(p, c.share_keys, rosters[p]) for p, c in clients.items()}
    for p, box in boxes.items():
        sent[p] += sum(len(b) + 4 for b in box.values())
    began = time.perf_counter()
    routed = server.route_shares(boxes)
    server_seconds += time.perf_counter() - began
    masked = {}
    for p in routed:
        received[p] += sum(len(b) + 4 for b in routed[p].values())
        if p in dropped:
            continue
        masked[p] = timed(p, clients[p].masked_input, routed[p], updates[p])
        sent[p] += masked[p].nbytes
    began = time.perf_counter()
    survivors = server.collect_masked(masked)
    server_seconds += time.perf_counter() - began
    answers = {}
    for p in survivors:
        told = server.survivors_for(p)
        received[p] += 4 * len(told)
        answers[p] = timed(p, clients[p].unmask, told)
        sent[p] += len(answers[p]) * (4 + 1 + SHARE_BYTES)
    began = time.perf_counter()
    total = server.unmask(answers)
    server_seconds += time.perf_counter() - began

    error = float(np.max(np.abs(total - plain)))
    alive = [p for p in updates if p not in dropped]
    per_client = np.mean([client_seconds[p] for p in alive])
    bytes_client = np.mean([sent[p] + received[p] for p in alive])
    plain_bytes = 4 * length  # the float32 update sent; the model received is the same in both
    kind = "SecAgg" if args.degree is None else f"SecAgg+ (degree {args.degree})"
    print(f"{kind}: {n} clients x {length:,} params, t={t}, {len(dropped)} dropped after sharing keys")
    print()
    print("| | secure aggregation | plain |")
    print("|---|---:|---:|")
    print(f"| client seconds (mean, its own steps) | {per_client:.3f} | 0 |")
    print(f"| server seconds (route, check, unmask) | {server_seconds:.3f} | {plain_seconds:.4f} |")
    print(f"| bytes per client, sent + received | {bytes_client:,.0f} | {plain_bytes:,} |")
    print(f"| expansion over the float32 update | {bytes_client / plain_bytes:.3f}x | 1x |")
    print(f"| max error of the sum (bound {quantizer.bound(len(alive)):.2e}) | {error:.2e} | 0 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
