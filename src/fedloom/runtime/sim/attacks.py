"""Simulated attackers, to exercise robust aggregation: poisoned training data and poisoned updates.

An :class:`~fedloom.core.config.AttackConfig` says who attacks and how. :func:`choose_attackers` resolves it to
client ids; :func:`poison_federation` gives the attackers poisoned training data (``label_flip``, ``backdoor``);
:class:`AttackGrid` wraps any simulation grid and rewrites the attackers' ``fit`` replies (``scale``, ``noise``,
a boosted ``backdoor``) before the server sees them. A deployment never uses this module.

Measuring a backdoor: take the test examples whose label is not the target, set their trigger with
:func:`add_trigger` (the value an attacker used is the largest feature value of its training data; for
in-memory data, the largest of the training set is a close stand-in), label them ``target_label``, and
evaluate the global model on them: their accuracy is the attack's success rate.

    attackers = choose_attackers((AttackConfig("scale", fraction=0.2),), data.client_ids, seed=0)
    grid = AttackGrid(InlineGrid(task, poison_federation(data, attackers, data.num_classes, 0)), attackers)
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from fedloom.core.config import AttackConfig
from fedloom.core.counting import share_of
from fedloom.core.errors import ConfigError
from fedloom.core.message import Message, MessageKind
from fedloom.core.params import Params
from fedloom.data.base import ArrayData, ClientData, FederatedData, Federation
from fedloom.runtime.grid import Exchange, Grid, Reply, ReplyHandler

__all__ = ["AttackGrid", "add_trigger", "attack_update", "choose_attackers", "describe_attackers", "poison_federation"]

# Mixed into the seeds of the attack streams, so they differ from each other and from dropout and availability.
_CHOOSE_SALT = 0xA77C
_BACKDOOR_SALT = 0xBAD0
_NOISE_SALT = 0x9015

_DATA_KINDS = ("label_flip", "backdoor")

#: What an update attack does to one floating-point array (as float64), given its name.
_Change = Callable[[str, npt.NDArray[np.float64]], npt.NDArray[np.float64]]


def _attacks_update(attack: AttackConfig) -> bool:
    """Whether ``attack`` rewrites the attacker's ``fit`` replies (not only its training data)."""
    return attack.kind in ("scale", "noise") or (attack.kind == "backdoor" and attack.boost != 1.0)


def _client_key(client_id: str) -> int:
    return zlib.crc32(client_id.encode())


def choose_attackers(attacks: Sequence[AttackConfig], client_ids: Sequence[str], seed: int) -> dict[str, AttackConfig]:
    """Which client runs which attack: ``{client id: attack}``.

    Each attack's explicit ``clients`` come first; then, attack by attack, ``floor(fraction * len(client_ids))``
    clients drawn from ``seed`` among those not chosen yet (so explicit clients do not count towards a
    fraction). The same attacks, clients and seed give the same attackers. Raises :class:`ConfigError` for an
    explicit id that is not a client, a client named by two attacks, fractions that ask for more clients than
    are left, and an attack that ends up choosing nobody (a fraction too small for the federation).
    """
    chosen: dict[str, AttackConfig] = {}
    for attack in attacks:
        for client_id in attack.clients:
            if client_id not in client_ids:
                raise ConfigError(f"attack {attack.kind}: unknown client {client_id!r}")
            if client_id in chosen:
                raise ConfigError(
                    f"client {client_id!r} is chosen by two attacks ({chosen[client_id].kind} and {attack.kind}); "
                    "a client attacks one way at most"
                )
            chosen[client_id] = attack
    total = len(client_ids)
    free = np.ones(total, dtype=np.bool_)
    for client_id in chosen:
        free[client_ids.index(client_id)] = False
    rng = np.random.default_rng([seed, _CHOOSE_SALT])
    for attack in attacks:
        count = share_of(attack.fraction, total)
        if count == 0 and not attack.clients:
            raise ConfigError(f"attack {attack.kind}: fraction {attack.fraction} of {total} clients chooses nobody")
        left = np.flatnonzero(free)
        if count > len(left):
            raise ConfigError(
                f"attack {attack.kind}: fraction {attack.fraction} asks for {count} clients, but only {len(left)} "
                f"of {total} are not attacking already"
            )
        picked = np.sort(rng.choice(left, size=count, replace=False))
        free[picked] = False
        for position in picked:
            chosen[client_ids[int(position)]] = attack
    return chosen


def describe_attackers(attackers: Mapping[str, AttackConfig], num_clients: int) -> str:
    """One line on who attacks and how, e.g. ``4 of 20 clients attack: 4 scale (scale -10)``."""
    counts: dict[str, int] = {}
    for attack in attackers.values():
        options = {
            "scale": f"scale {attack.scale:g}",
            "noise": f"sigma {attack.sigma:g}",
            "label_flip": "",
            "backdoor": f"target {attack.target_label}, {attack.poison_fraction:g} poisoned, boost {attack.boost:g}",
        }[attack.kind]
        how = f"{attack.kind} ({options})" if options else attack.kind
        counts[how] = counts.get(how, 0) + 1
    ways = ", ".join(f"{n} {how}" for how, n in counts.items())
    return f"{len(attackers)} of {num_clients} clients attack: {ways}"


# ---------------------------------------------------------------------------------------------- training data


def add_trigger(x: npt.NDArray[np.generic], trigger_size: int, value: float) -> npt.NDArray[np.generic]:
    """A copy of ``x`` (one example per row, any shape after that) whose last ``trigger_size`` features of
    every example (in row-major order) are ``value``: the backdoor trigger. Raises :class:`ConfigError` when an
    example has fewer features than that."""
    features = int(np.prod(x.shape[1:], dtype=np.int64))
    if trigger_size > features:
        raise ConfigError(f"attack trigger_size {trigger_size} exceeds the {features} features of an example")
    triggered = np.array(x, copy=True, order="C")
    triggered.reshape(len(triggered), features)[:, features - trigger_size :] = value
    return triggered


def _poisoned(train: ArrayData, attack: AttackConfig, num_classes: int, seed: int, client_id: str) -> ArrayData:
    if attack.kind == "label_flip":
        return ArrayData(train.x, (num_classes - 1 - train.y).astype(train.y.dtype))
    if attack.target_label >= num_classes:
        raise ConfigError(f"attack target_label {attack.target_label} is not a class of {num_classes}")
    n = len(train)
    if n == 0:
        return train
    rng = np.random.default_rng([seed, _BACKDOOR_SALT, _client_key(client_id)])
    rows = rng.choice(n, size=share_of(attack.poison_fraction, n), replace=False)
    x = np.array(train.x, copy=True)
    x[rows] = add_trigger(train.x[rows], attack.trigger_size, float(train.x.max()))
    y = np.array(train.y, copy=True)
    y[rows] = attack.target_label
    return ArrayData(x, y)


def poison_federation(
    data: Federation, attackers: Mapping[str, AttackConfig], num_classes: int, seed: int
) -> Federation:
    """``data`` with the training data of the ``label_flip`` and ``backdoor`` attackers poisoned.

    ``label_flip`` maps each training label ``y`` to ``num_classes - 1 - y``. ``backdoor`` picks
    ``floor(poison_fraction * n)`` of the attacker's ``n`` training examples (drawn from ``seed`` and the
    client id), sets their trigger (:func:`add_trigger`, with the largest feature value of the attacker's
    training data) and gives them ``target_label``. Test splits, the central test set and every other client's
    data are the same objects as in ``data``; ``data`` itself is not changed. Without data attackers, ``data``
    comes back as it is.

    Raises :class:`ConfigError` for a federation that is not an in-memory :class:`FederatedData` (a lazy one
    makes a client's data anew on every look-up, so there is no data to poison once), a ``target_label`` that
    is not a class, or a trigger larger than an example.
    """
    poisoned = {cid: attack for cid, attack in attackers.items() if attack.kind in _DATA_KINDS}
    if not poisoned:
        return data
    if not isinstance(data, FederatedData):
        raise ConfigError(
            f"the {', '.join(sorted({a.kind for a in poisoned.values()}))} attack poisons training data held in "
            f"memory; {type(data).__name__} {data.name!r} makes its clients' data on demand (use a scale or noise "
            "attack on it)"
        )
    clients = dict(data.clients)
    for client_id, attack in poisoned.items():
        own = clients[client_id]
        clients[client_id] = ClientData(_poisoned(own.train, attack, num_classes, seed, client_id), own.test)
    return dataclasses.replace(data, clients=clients)


# ---------------------------------------------------------------------------------------------- updates


def attack_update(
    sent: Params, trained: Params, attack: AttackConfig, rng: np.random.Generator | None = None
) -> Params:
    """The params an attacker replies with, having been sent ``sent`` and trained ``trained``.

    ``scale`` (and ``backdoor``, with ``boost``): ``sent + factor * (trained - sent)`` for every floating-point
    array of ``trained`` that ``sent`` has in the same shape (others are left as trained). ``noise``:
    ``trained + N(0, sigma^2)`` for every floating-point array, drawn from ``rng`` in the order of ``trained``.
    Arithmetic is in float64, cast back to each array's dtype; integer and boolean arrays are left alone.
    Other kinds return ``trained`` unchanged. Pure: neither input changes.
    """
    if attack.kind == "noise":
        if rng is None:
            raise ConfigError("the noise attack needs a random generator")
        draw = rng
        return _map_floats(trained, lambda _name, w: w + draw.normal(0.0, attack.sigma, size=w.shape))
    factor = {"scale": attack.scale, "backdoor": attack.boost}.get(attack.kind)
    if factor is None or factor == 1.0:
        return trained

    def scaled(name: str, w: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        start = sent.get(name)
        if start is None or start.shape != w.shape:
            return w
        g = start.astype(np.float64)
        return g + factor * (w - g)

    return _map_floats(trained, scaled)


def _map_floats(params: Params, change: _Change) -> Params:
    out: dict[str, npt.NDArray[np.generic]] = {}
    for name, array in params.items():
        if np.issubdtype(array.dtype, np.floating):
            out[name] = np.asarray(change(name, array.astype(np.float64))).astype(array.dtype)
        else:
            out[name] = array
    return Params(out, copy=False)


class AttackGrid:
    """A grid whose attacking clients rewrite their ``fit`` replies before the server sees them.

    ``attackers`` maps client ids to their attack (:func:`choose_attackers`); only update attacks (``scale``,
    ``noise``, ``backdoor`` with ``boost != 1``) act here, data attacks act through
    :func:`poison_federation`. For a ``fit`` instruction to such a client, its ``fit.result`` reply's params
    become :func:`attack_update` of the params it was sent and the params it trained; noise is drawn from
    ``seed``, the round and the client. Everything else passes through untouched: ``client_ids``, evaluation
    (attackers answer it honestly), drops and lateness, the reply's metrics and byte counts. ``on_reply`` sees
    the attacked reply, and the exchange holds what it returns.

        grid = AttackGrid(InlineGrid(task, data), {"client-003": AttackConfig("scale", clients=("client-003",))})
    """

    def __init__(self, grid: Grid, attackers: Mapping[str, AttackConfig], *, seed: int = 0) -> None:
        for client_id, attack in attackers.items():
            if not isinstance(attack, AttackConfig):
                raise ConfigError(f"the attack of client {client_id!r} must be an AttackConfig, got {attack!r}")
        self._inner = grid
        self._attackers = {cid: attack for cid, attack in attackers.items() if _attacks_update(attack)}
        self._seed = int(seed)

    def client_ids(self) -> Sequence[str]:
        return self._inner.client_ids()

    def send_and_receive(
        self, messages: Mapping[str, Message], timeout: float | None = None, on_reply: ReplyHandler | None = None
    ) -> Exchange:
        def attacked(client_id: str, reply: Reply) -> Reply:
            reply = self._attack(client_id, messages.get(client_id), reply)
            return on_reply(client_id, reply) if on_reply is not None else reply

        return self._inner.send_and_receive(messages, timeout, attacked)

    def _attack(self, client_id: str, instruction: Message | None, reply: Reply) -> Reply:
        attack = self._attackers.get(client_id)
        answer = reply.message
        if (
            attack is None
            or instruction is None
            or instruction.kind != MessageKind.FIT
            or answer.kind != MessageKind.FIT_RESULT
        ):
            return reply
        server_round = instruction.metadata.get("round", 0)
        rng = np.random.default_rng([self._seed, _NOISE_SALT, int(server_round), _client_key(client_id)])
        params = attack_update(instruction.params, answer.params, attack, rng)
        return dataclasses.replace(reply, message=Message(answer.kind, params, answer.metadata))
