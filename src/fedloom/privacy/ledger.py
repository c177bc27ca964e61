"""The privacy ledger: per run, an append-only, hash-chained record of what left each client each round.

Each line of ``ledger.jsonl`` in a run directory is one client's update that the server used: its round, the
client, the SHA-256 of the update's canonical encoding, the privacy measures that applied to it (the clip
norm, the noise multiplier, the protection on the wire) and the privacy the run had spent after that round.
Each record carries the hash of the one before it (``prev``) and its own (``hash``: SHA-256 of ``prev`` and the
record's canonical JSON), and the first one chains to a hash of the run id, so a record cannot be edited,
removed, moved or moved into another run without breaking every hash after it. The head hash after each
round is also written into that round's checkpoint, so cutting records off the end is caught too.
:func:`verify` checks all of it (``fedloom ledger verify RUN``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedloom.core.errors import FedloomError
from fedloom.core.params import Params
from fedloom.core.results import FitResult
from fedloom.core.strictjson import strict_dumps

__all__ = [
    "LEDGER_FILE",
    "LedgerError",
    "LedgerReport",
    "chain",
    "fit_digest",
    "genesis",
    "update_digest",
    "used_updates",
    "verify",
]

LEDGER_FILE = "ledger.jsonl"
_FIELDS = (
    "round",
    "client",
    "update_sha256",
    "num_examples",
    "clip_norm",
    "noise_multiplier",
    "protection",
    "epsilon",
    "delta",
)


class LedgerError(FedloomError):
    """A privacy ledger is missing, unreadable, or does not verify (a record was edited, removed or added)."""


def update_digest(params: Params) -> str:
    """SHA-256 of an update: each array's name, dtype, shape and little-endian bytes, in order, hashed in place
    (no copy of a contiguous model)."""
    digest = hashlib.sha256()
    for name, array in params.items():
        little = array if array.dtype.byteorder != ">" else array.astype(array.dtype.newbyteorder("<"))
        digest.update(f"{name}\0{little.dtype.str}\0{little.shape}\0".encode())
        digest.update(np.ascontiguousarray(little).data)
    return digest.hexdigest()


def fit_digest(result: FitResult) -> str:
    """What the ledger records of a client's fit result that the server accepted: its update's
    :func:`update_digest`.

    The ledger is written when the round is recorded (:class:`~fedloom.tracking.RunRecorder`), from the round's
    client records; by then a strategy that folds updates as they come (FedAvg) has let the update's arrays go.
    So both server loops call this as they accept the reply, and carry the digest to the ledger in the client's
    record (``update_sha256``)."""
    return update_digest(result.params)


def genesis(run_id: str) -> str:
    """The hash the first record of run ``run_id`` chains to."""
    return hashlib.sha256(f"fedloom privacy ledger of run {run_id}".encode()).hexdigest()


def _canonical(record: Mapping[str, Any]) -> str:
    return strict_dumps({k: record[k] for k in _FIELDS}, sort_keys=True, compact=True)


def _hash(prev: str, record: Mapping[str, Any]) -> str:
    return hashlib.sha256(f"{prev}\n{_canonical(record)}".encode()).hexdigest()


def chain(prev: str, records: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """``records`` (each with every ledger field) as ledger lines chained after ``prev``, and the new head."""
    lines = []
    for record in records:
        line = {k: record[k] for k in _FIELDS}
        line["prev"] = prev
        line["hash"] = prev = _hash(prev, line)
        lines.append(line)
    return lines, prev


def append(path: Path, lines: Iterable[Mapping[str, Any]]) -> None:
    """Append ``lines`` to the ledger at ``path`` and flush them to disk."""
    with path.open("a", encoding="utf-8") as out:
        for line in lines:
            out.write(strict_dumps(line, sort_keys=True) + "\n")
        out.flush()
        os.fsync(out.fileno())


def head(path: Path, run_id: str) -> str:
    """The hash of the ledger's last record (the genesis when it has none)."""
    last = genesis(run_id)
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                last = json.loads(line)["hash"]
    return last


def used_updates(path: Path, through_round: int) -> dict[str, dict[str, int]]:
    """The updates the ledger at ``path`` lists for rounds up to ``through_round``, by client: each update's digest
    and the first round it came in (how a resumed run knows what its sites sent before the restart). Empty where
    there is no ledger; lines that do not read as records are passed over (:func:`verify` names them)."""
    used: dict[str, dict[str, int]] = {}
    if not path.is_file():
        return used
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(text)
            server_round, client, digest = line["round"], line["client"], line["update_sha256"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        if isinstance(server_round, int) and server_round <= through_round:
            used.setdefault(str(client), {}).setdefault(str(digest), server_round)
    return used


@dataclass(frozen=True)
class LedgerReport:
    """A ledger that verified: its records, the rounds they cover, and its head hash."""

    records: int
    rounds: int
    head: str


def verify(path: Path, run_id: str, heads: Mapping[int, str] | None = None) -> LedgerReport:
    """Check the ledger at ``path`` of run ``run_id``: every line parses, chains to the one before (the first to
    :func:`genesis`) and hashes to its ``hash``; and, for each round in ``heads`` (the head hash written into
    that round's checkpoint), the chain passed through that hash at the end of that round. Raises
    :class:`LedgerError` naming the first line or round that does not hold."""
    if not path.is_file():
        raise LedgerError(f"{path} does not exist: this run has no privacy ledger")
    prev = genesis(run_id)
    at_round_end: dict[int, str] = {}
    count = 0
    last_round = 0
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LedgerError(f"{path}, line {number}: not JSON ({exc.msg})") from None
        if not isinstance(line, dict):
            raise LedgerError(f"{path}, line {number}: not a ledger record")
        missing = [k for k in (*_FIELDS, "prev", "hash") if k not in line]
        if missing:
            raise LedgerError(f"{path}, line {number}: no {', '.join(missing)}")
        if line["prev"] != prev:
            raise LedgerError(f"{path}, line {number}: does not chain to the record before it (removed or moved?)")
        if _hash(prev, line) != line["hash"]:
            raise LedgerError(f"{path}, line {number}: its hash does not match its contents (edited?)")
        if not isinstance(line["round"], int) or line["round"] < last_round:
            raise LedgerError(f"{path}, line {number}: round {line['round']!r} after round {last_round}")
        last_round = line["round"]
        prev = line["hash"]
        at_round_end[last_round] = prev
        count += 1
    for server_round, expected in sorted((heads or {}).items()):
        found = max((r for r in at_round_end if r <= server_round), default=None)
        actual = genesis(run_id) if found is None else at_round_end[found]
        if actual != expected:
            raise LedgerError(
                f"{path}: the ledger at the end of round {server_round} is not what that round's checkpoint "
                "recorded (records were removed, added or cut off)"
            )
    return LedgerReport(count, len(at_round_end), prev)
