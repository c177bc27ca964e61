"""Secure aggregation in a run: :class:`SecAgg` wraps a FedAvg (or a DP-FedAvg) so that each round's training
is the four-step protocol of :mod:`fedloom.privacy.secagg` and the server learns only the sum of the updates;
:class:`SecAggSessions` is the client's half, which every client runtime keeps between the protocol's messages.

A round, over any grid (the server loop's driver is :func:`fedloom.runtime.protocol.run_fit_protocol`):

=====================  ==============================================  ======================================
server sends           carrying                                        client answers
=====================  ==============================================  ======================================
``secagg.advertise``   party number, threshold, how to encode          ``secagg.keys``: two public keys
``secagg.share``       the public keys of its neighbourhood            ``secagg.shares``: encrypted shares
``secagg.mask``        the fit instruction, the shares sent to it      ``secagg.masked``: its masked update
``secagg.unmask``      who sent a masked update                        ``secagg.unmasked``: its key shares
=====================  ==============================================  ======================================

The client trains when the ``secagg.mask`` step comes, and masks what it sends:

- **mean** (around :class:`~fedloom.strategy.FedAvg`): the update ``w_k - w`` (bounded to the strategy's
  ``clip_norm`` by the client, where that is set), times the client's weight ``min(n_k, weight_cap) /
  weight_cap``, with the weight itself as one more coordinate. The server divides the sum by the summed weight:
  FedAvg's example-weighted mean, without learning any client's example count.
- **dp** (around :class:`~fedloom.privacy.DPFedAvg`, fixed clipping): distributed DP. The client clips its update
  to the round's ``C`` and adds Gaussian noise of standard deviation ``z C / sqrt(t)``, ``t`` being the number of
  clients that must survive; the server needs ``t`` survivors before it unmasks, so the sum carries noise of at
  least ``z C``, as DP-FedAvg's would. Neither the server nor anyone else sees a clipped update without that
  noise, and only the noised sum ever leaves the protocol.

Values are quantized into Z_2^32 (:class:`~fedloom.privacy.quantize.Quantizer`) with ``value_range`` as the clip
per coordinate: a coordinate outside ``[-value_range, value_range]`` is clipped, and each coordinate of the
decoded sum is within ``m step / 2`` of the sum of the clipped values for ``m`` survivors (recorded each round
as ``secagg_bound``, on the mean's scale).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fedloom.core.errors import ConfigError, DecodeError, NotEnoughClientsError, RoundFailedError
from fedloom.core.message import Message
from fedloom.core.params import Params
from fedloom.privacy import shamir
from fedloom.privacy.dp import DPFedAvg, DPState
from fedloom.privacy.quantize import Quantizer
from fedloom.privacy.secagg import SecAggClient, SecAggError, SecAggServer, neighbourhoods
from fedloom.privacy.updates import (
    Layout,
    ProtocolWrapper,
    check_summable,
    check_whole,
    fit_vector,
    layout_of,
    mean_encoding,
    mean_release,
    quantizer_of,
    unflatten,
    vector_length,
)
from fedloom.strategy.base import FitProtocol, ProtocolResult, SummableStrategy
from fedloom.strategy.fedavg import FedAvg

__all__ = ["SECAGG_KINDS", "SecAgg", "SecAggSessions"]

log = logging.getLogger("fedloom.secagg")

ADVERTISE, KEYS = "secagg.advertise", "secagg.keys"
SHARE, SHARES = "secagg.share", "secagg.shares"
MASK, MASKED = "secagg.mask", "secagg.masked"
UNMASK, UNMASKED = "secagg.unmask", "secagg.unmasked"
REFUSED = "secagg.refused"
#: The instructions a client answers with :class:`SecAggSessions`.
SECAGG_KINDS = frozenset({ADVERTISE, SHARE, MASK, UNMASK})


@dataclass(frozen=True)
class SecAgg(ProtocolWrapper):
    """Secure aggregation (Bonawitz et al. 2017; SecAgg+ of Bell et al. 2020 with ``degree``) around
    ``strategy``: any strategy whose aggregate is a weighted sum of its clients' updates (a
    :class:`~fedloom.strategy.base.SummableStrategy`: FedAvg, FedProx, FedAvgM, FedAdagrad/FedAdam/FedYogi;
    no robust aggregator, which needs the individual updates) or a :class:`~fedloom.privacy.DPFedAvg` with
    fixed clipping (distributed DP). See the module docstring for what the clients send.

    - ``threshold``: the share of a round's parties (of a neighbourhood, with ``degree``) that must stay to the
      end: ``t = floor(threshold * size) + 1``. Fewer ends the round with :class:`SecAggError`. Up to ``t - 1``
      parties colluding with the server learn nothing of another's update.
    - ``degree``: SecAgg+: each client deals with ``degree`` random neighbours instead of every other client,
      so its work grows with ``degree`` (take about ``3 log2 n``), not with the cohort ``n``. ``None``: all.
    - ``value_range``: the quantizer's clip per coordinate (default: 1.0 for a mean, ``C (1 + 4 z / sqrt(t))``
      for distributed DP).
    - ``weight_cap``: (mean) the number of examples at which a client's weight stops growing.
    - ``max_failed_rounds``: a round that loses more parties than the threshold allows fails (the model stays
      as it was, the round is recorded with the reason); the run fails once this many rounds in a row have.

    >>> strategy = SecAgg(FedAvg(clients_per_round=20), degree=12)
    """

    strategy: SummableStrategy[Any] | DPFedAvg = field(default_factory=FedAvg)
    threshold: float = 0.5
    degree: int | None = None
    value_range: float | None = None
    weight_cap: int = 1000
    max_failed_rounds: int = 3

    def __post_init__(self) -> None:
        check_whole("max_failed_rounds", self.max_failed_rounds)
        inner = self.strategy.strategy if isinstance(self.strategy, DPFedAvg) else self.strategy
        check_summable(inner, wrapper="SecAgg", value_range=self.value_range, weight_cap=self.weight_cap)
        if isinstance(self.strategy, DPFedAvg) and self.strategy.target_quantile is not None:
            raise ConfigError(
                "adaptive clipping needs the count of clipped updates, which secure aggregation does not release: "
                "give DPFedAvg a fixed clip (no target_quantile)"
            )
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.degree is not None and (isinstance(self.degree, bool) or self.degree < 2):
            raise ConfigError(f"degree must be a whole number >= 2 (or None for every client), got {self.degree!r}")

    # -- the protocol ------------------------------------------------------------------------------------------

    def thresholds(self, cohort: int) -> tuple[int, int]:
        """For a cohort of ``cohort`` parties: the protocol's threshold ``t`` (per neighbourhood, with
        ``degree``) and the fewest parties that must send their masked input."""
        overall = min(cohort, math.floor(self.threshold * cohort) + 1)
        if self.degree is None or self.degree >= cohort - 1:
            return overall, overall
        return math.floor(self.threshold * (self.degree + 1)) + 1, overall

    def _graph(self, parties: list[int]) -> dict[int, frozenset[int]] | None:
        """SecAgg+'s neighbourhoods over the parties that advertised keys (``None``: everyone deals with everyone,
        also when they are too few for ``degree``)."""
        degree = self.degree
        if degree is not None and degree % 2 and len(parties) % 2:
            degree += 1  # a regular graph needs n * degree even
        if degree is None or degree >= len(parties) - 1:
            return None
        return neighbourhoods(parties, degree, np.random.default_rng(secrets.randbits(128)))

    def fit_protocol(self, server_round: int, state: Any, instructions: Mapping[str, Message]) -> FitProtocol[Any]:
        """The round's four exchanges (see the module docstring), as a generator for
        :func:`~fedloom.runtime.protocol.run_fit_protocol`. Raises :class:`~fedloom.core.errors.RoundFailedError`
        when fewer parties than the threshold are left at any step, :class:`NotEnoughClientsError` for a cohort
        below 2."""
        try:
            return (yield from self._exchanges(server_round, state, instructions))
        except SecAggError as lost:
            raise RoundFailedError(f"secure aggregation lost too many parties: {lost}") from lost

    def _exchanges(self, server_round: int, state: Any, instructions: Mapping[str, Message]) -> FitProtocol[Any]:
        cohort = list(instructions)
        if len(cohort) < 2:
            raise NotEnoughClientsError(
                f"round {server_round}: secure aggregation needs at least 2 clients, {len(cohort)} were chosen"
            )
        layout = layout_of(instructions)
        party = {cid: p for p, cid in enumerate(cohort, start=1)}
        client = {p: cid for cid, p in party.items()}
        t, overall = self.thresholds(len(cohort))
        encoding = self._encoding(state, len(cohort), overall)
        length = vector_length(layout, encoding)
        quantizer = quantizer_of(encoding)
        server = SecAggServer(threshold=t, quantizer=quantizer, length=length)
        base = {"round": server_round, "session": secrets.token_hex(16)}

        replies = yield {
            cid: Message(ADVERTISE, metadata={**base, "party": party[cid], "threshold": t, "encoding": encoding})
            for cid in cohort
        }
        server.collect_keys(_read(replies, KEYS, party, _keys))
        server.neighbours = self._graph(sorted(server.roster))
        replies = yield {
            client[p]: Message(SHARE, metadata={**base, "party": p, "roster": _roster_out(server.roster_for(p))})
            for p in server.roster
        }
        routed = server.route_shares(_read(replies, SHARES, party, _boxes))
        replies = yield {
            client[p]: Message(
                MASK,
                params=instructions[client[p]].params,
                metadata={
                    **base,
                    "party": p,
                    "instruction": dict(instructions[client[p]].metadata),
                    "shares": _b64map(boxes),
                },
            )
            for p, boxes in routed.items()
        }
        masked = _read(replies, MASKED, party, lambda m: _masked(m, length))
        survivors = server.collect_masked(masked)
        if len(survivors) < overall:
            raise SecAggError(f"only {len(survivors)} parties sent masked input, below {overall}")
        if len(survivors) < len(server.sharers):
            gone = sorted(client[p] for p in server.sharers - set(survivors))
            log.warning(
                "round %d: %s dropped after sharing keys; their masks are rebuilt from the others' shares",
                server_round,
                ", ".join(gone),
            )
        used = {client[p]: hashlib.sha256(masked[p].tobytes()).hexdigest() for p in survivors}
        replies = yield {
            client[p]: Message(UNMASK, metadata={**base, "party": p, "survivors": server.survivors_for(p)})
            for p in survivors
        }
        total = server.unmask(_read(replies, UNMASKED, party, _answers))
        state, metrics = self._release(server_round, state, total, layout, len(survivors), quantizer)
        metrics.update(
            secagg_clients=float(len(cohort)), secagg_survivors=float(len(survivors)), secagg_threshold=float(t)
        )
        return ProtocolResult(state, metrics, used)

    def _encoding(self, state: Any, cohort: int, overall: int) -> dict[str, Any]:
        """What the clients need to encode their update: the mode, the quantizer, and the clip and noise."""
        if isinstance(self.strategy, DPFedAvg):
            assert isinstance(state, DPState)
            noise = self.strategy.noise_multiplier * state.clip / math.sqrt(overall)
            value_range = self.value_range or state.clip * (
                1.0 + 4.0 * self.strategy.noise_multiplier / math.sqrt(overall)
            )
            return {"mode": "dp", "range": value_range, "clients": cohort, "clip_norm": state.clip, "noise": noise}
        return mean_encoding(self.strategy, self.value_range or 1.0, cohort, self.weight_cap)

    def _release(
        self,
        server_round: int,
        state: Any,
        total: npt.NDArray[np.float64],
        layout: Layout,
        survivors: int,
        quantizer: Quantizer,
    ) -> tuple[Any, dict[str, float]]:
        if isinstance(self.strategy, DPFedAvg):
            noised = unflatten(total, layout)
            new_state, metrics = self.strategy.release(server_round, state, noised, survivors)
            scale = self.strategy.sample_rate * self.strategy.num_clients
            return new_state, {**metrics, "secagg_bound": quantizer.bound(survivors) / scale}
        after, weight = mean_release(self.strategy, server_round, state, total, layout)
        return after, {"secagg_bound": quantizer.bound(survivors) / weight}


class SecAggSessions:
    """A client runtime's open secure-aggregation rounds: each party's keys and shares, in memory between the
    protocol's messages (never on disk). One object serves every client a runtime runs; a new round's first
    message closes the rounds before it, and a party's round closes once it has answered the unmasking, so it
    can never be asked to unmask twice (which would reveal its update)."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, int], _Party] = {}

    def __len__(self) -> int:
        return len(self._open)

    def answer(self, message: Message, train: Callable[[Message], Message]) -> Message:
        """The reply to one ``secagg.*`` instruction; ``train`` runs a fit instruction on this client's data
        and returns the fit reply. Raises :class:`DecodeError` for a message that does not fit the protocol
        (a step of a round this runtime does not have open). A step the client refuses because it would break
        the protocol (a roster or survivor list below the threshold, a share that does not decrypt) is answered
        ``secagg.refused`` with the reason, and the party's round is closed: the server counts it as gone."""
        try:
            session, number = str(message.metadata["session"]), int(message.metadata["party"])
            server_round = int(message.metadata["round"])
        except (KeyError, TypeError, ValueError):
            raise DecodeError(f"a {message.kind} instruction without its session, party or round") from None
        key = (session, number)
        reply = {"round": server_round, "session": session, "party": number}
        if message.kind == ADVERTISE:
            self._open = {k: v for k, v in self._open.items() if k[0] == session}
            party = _Party.start(number, message.metadata)
            self._open[key] = party
            encrypt, agree = party.client.advertise()
            return Message(KEYS, metadata={**reply, "keys": [_b64(encrypt), _b64(agree)]})
        opened = self._open.get(key)
        if opened is None:
            raise DecodeError(f"no open secure aggregation round for party {number} (step {message.kind})")
        try:
            return self._step(opened, message, train, reply)
        except SecAggError as refusal:
            self._open.pop(key, None)
            log.warning("secure aggregation round %d: party %d refuses: %s", server_round, number, refusal)
            return Message(REFUSED, metadata={**reply, "reason": str(refusal)})

    def _step(
        self, party: _Party, message: Message, train: Callable[[Message], Message], reply: dict[str, Any]
    ) -> Message:
        if message.kind == SHARE:
            roster = _roster_in(message.metadata.get("roster"))
            return Message(SHARES, metadata={**reply, "shares": _b64map(party.client.share_keys(roster))})
        if message.kind == MASK:
            shares = {int(u): _unb64(box) for u, box in _mapping(message.metadata.get("shares")).items()}
            vector = party.encode(message, train)
            return Message(MASKED, Params({"masked": party.client.masked_input(shares, vector)}), reply)
        if message.kind == UNMASK:
            del self._open[(reply["session"], reply["party"])]  # answered once, never again
            survivors = [int(v) for v in message.metadata.get("survivors", ())]
            answers = party.client.unmask(survivors)
            return Message(
                UNMASKED, metadata={**reply, "shares": {str(u): [k, s[0], hex(s[1])] for u, (k, s) in answers.items()}}
            )
        raise DecodeError(f"unknown secure aggregation step {message.kind!r}")


@dataclass
class _Party:
    """One client's side of one round: the protocol state machine and how to encode its update."""

    client: SecAggClient
    encoding: Mapping[str, Any]

    @staticmethod
    def start(number: int, metadata: Mapping[str, Any]) -> _Party:
        encoding = _mapping(metadata.get("encoding"))
        try:
            threshold = int(metadata["threshold"])
            mode = encoding["mode"]
            if mode not in ("mean", "dp"):
                raise ValueError(mode)
            quantizer = quantizer_of(encoding)
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise DecodeError(f"a secure aggregation round with an encoding this client cannot use: {exc}") from None
        return _Party(SecAggClient(number, threshold, quantizer), encoding)

    def encode(self, message: Message, train: Callable[[Message], Message]) -> npt.NDArray[np.float64]:
        """Train on the fit instruction in ``message`` and return the flat vector to mask (module docstring)."""
        return fit_vector(message.params, _mapping(message.metadata.get("instruction")), self.encoding, train)


# -- encoding on the wire (metadata is JSON: bytes travel as base64) ---------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise DecodeError("expected base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise DecodeError("bad base64") from None


def _b64map(boxes: Mapping[int, bytes]) -> dict[str, str]:
    return {str(v): _b64(box) for v, box in boxes.items()}


def _mapping(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise DecodeError(f"expected a mapping, got {type(value).__name__}")
    return value


def _roster_out(roster: Mapping[int, tuple[bytes, bytes]]) -> dict[str, list[str]]:
    return {str(v): [_b64(c), _b64(s)] for v, (c, s) in roster.items()}


def _roster_in(value: Any) -> dict[int, tuple[bytes, bytes]]:
    return {int(v): _keys_of(keys) for v, keys in _mapping(value).items()}


def _keys_of(keys: Any) -> tuple[bytes, bytes]:
    if not isinstance(keys, list) or len(keys) != 2:
        raise DecodeError("a party's keys are a pair")
    encrypt, agree = _unb64(keys[0]), _unb64(keys[1])
    if len(encrypt) != 32 or len(agree) != 32:
        raise DecodeError("an X25519 public key is 32 bytes")
    return encrypt, agree


def _keys(message: Message) -> tuple[bytes, bytes]:
    return _keys_of(message.metadata.get("keys"))


def _boxes(message: Message) -> dict[int, bytes]:
    return {int(v): _unb64(box) for v, box in _mapping(message.metadata.get("shares")).items()}


def _masked(message: Message, length: int) -> npt.NDArray[np.uint32]:
    vector = message.params.get("masked") if list(message.params) == ["masked"] else None
    if vector is None or vector.dtype != np.uint32 or vector.shape != (length,):
        raise DecodeError(f"a masked input must be one uint32 vector of {length} values")
    return vector.astype(np.uint32, copy=False)


def _answers(message: Message) -> dict[int, tuple[str, shamir.Share]]:
    out = {}
    for u, item in _mapping(message.metadata.get("shares")).items():
        if not isinstance(item, list) or len(item) != 3 or item[0] not in ("b", "s") or not isinstance(item[1], int):
            raise DecodeError("an unmasking share is [kind, x, y]")
        out[int(u)] = (str(item[0]), (int(item[1]), int(str(item[2]), 16)))
    return out


def _read(
    replies: Mapping[str, Message], kind: str, party: Mapping[str, int], parse: Callable[[Message], Any]
) -> dict[int, Any]:
    """Each reply of ``kind`` parsed, by party; a reply that does not parse counts as the client dropping."""
    out = {}
    for cid, message in replies.items():
        try:
            if message.kind != kind or cid not in party:
                raise DecodeError(f"expected {kind}, got {message.kind}")
            out[party[cid]] = parse(message)
        except (DecodeError, KeyError, TypeError, ValueError) as exc:
            log.warning("secure aggregation: ignored client %s's %s reply: %s", cid, kind, exc)
    return out
