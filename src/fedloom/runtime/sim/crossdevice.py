"""Cross-device systems around any simulation grid: who is online, how fast each client is, a round deadline.

:class:`SystemGrid` wraps a grid (inline, vectorized, ...) and applies a :class:`~fedloom.core.config.SystemConfig`
on a simulated clock, so the same strategy and loop run on a federation where most of a million registered
clients are offline at any time and the slowest ones miss the deadline.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import numpy.typing as npt

from fedloom.core.config import FitConfig, SystemConfig
from fedloom.core.errors import ConfigError
from fedloom.core.message import Message, MessageKind
from fedloom.core.results import parse_instruction
from fedloom.data.base import Federation
from fedloom.data.lazy import ClientIds
from fedloom.runtime.grid import Exchange, Grid, Reply, ReplyHandler, hand_over

__all__ = ["AvailabilityTrace", "SystemGrid", "SystemRound", "local_steps"]

# Mixed into the seeds of the availability and speed streams, so they differ from each other and from dropout.
_AVAILABILITY_SALT = 0xA7A1
_SPEED_SALT = 0x5BED


def local_steps(num_examples: int, config: FitConfig) -> int:
    """How many SGD steps a client with ``num_examples`` training examples takes for ``config``: ``local_steps``,
    or ``local_epochs * ceil(num_examples / batch_size)`` (as :func:`fedloom.task.batching.minibatches` does)."""
    if config.local_steps is not None:
        return config.local_steps
    epochs = config.local_epochs or 0
    return epochs * math.ceil(num_examples / config.batch_size)


class AvailabilityTrace:
    """When each client is online: intervals ``[start, end)`` of simulated seconds, read from an ``.npz`` file.

    The file holds three equally long 1-D arrays: ``client`` (registration numbers, ``0 .. num_clients-1``),
    ``start`` and ``end`` (finite, ``start <= end``). A client may have any number of intervals, or none (never
    online). Raises :class:`ConfigError` for a missing or unreadable file, or arrays that break these rules.
    """

    def __init__(self, path: str | Path, num_clients: int) -> None:
        self.path = str(path)
        arrays = _read_npz(self.path, ("client", "start", "end"))
        client, start, end = arrays["client"], arrays["start"], arrays["end"]
        if any(a.ndim != 1 for a in (client, start, end)) or not len(client) == len(start) == len(end):
            raise ConfigError(f"availability trace {self.path}: client, start and end must be 1-D and equally long")
        if len(client) and not np.issubdtype(client.dtype, np.integer):
            raise ConfigError(f"availability trace {self.path}: client must hold integers, got {client.dtype}")
        if len(client) and (client.min() < 0 or client.max() >= num_clients):
            raise ConfigError(
                f"availability trace {self.path}: client numbers must be in [0, {num_clients}), "
                f"got {client.min()} .. {client.max()}"
            )
        try:
            start, end = start.astype(np.float64), end.astype(np.float64)
        except (TypeError, ValueError):
            raise ConfigError(f"availability trace {self.path}: start and end must be numbers") from None
        if not (np.all(np.isfinite(start)) and np.all(np.isfinite(end)) and np.all(start <= end)):
            raise ConfigError(f"availability trace {self.path}: every interval needs finite start <= end")
        self._client = client.astype(np.int64)
        self._start, self._end = start, end
        self._num_clients = num_clients

    def next_start(self, time: float) -> float | None:
        """The earliest interval start after simulated second ``time``; ``None`` when no client comes online
        again."""
        later = self._start[self._start > time]
        return float(later.min()) if len(later) else None

    def online(self, time: float) -> npt.NDArray[np.bool_]:
        """A mask over all registered clients: who is online at simulated second ``time``."""
        mask = np.zeros(self._num_clients, dtype=np.bool_)
        mask[self._client[(self._start <= time) & (time < self._end)]] = True
        return mask


def _read_npz(path: str, names: tuple[str, ...]) -> dict[str, npt.NDArray[Any]]:
    """The arrays ``names`` of the ``.npz`` file at ``path``; :class:`ConfigError` if that cannot be done."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ConfigError(f"availability trace {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"availability trace {path} is not a readable .npz file: {exc}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ConfigError(f"availability trace {path} is a single array; it must be an .npz file of arrays")
    with loaded as archive:
        missing = [name for name in names if name not in archive.files]
        if missing:
            raise ConfigError(
                f"availability trace {path} has no array {', '.join(missing)}; it needs {', '.join(names)}"
            )
        try:
            return {name: np.asarray(archive[name]) for name in names}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"availability trace {path} is not a readable .npz file: {exc}") from None


class _Online(Sequence[str]):
    """The client ids at the (ascending) registration numbers ``numbers``, made when asked for."""

    def __init__(self, ids: Sequence[str], numbers: npt.NDArray[np.intp], number_of: Callable[[str], int]) -> None:
        self._ids = ids
        self._numbers = numbers
        self._number_of = number_of

    def __len__(self) -> int:
        return len(self._numbers)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> _Online: ...

    def __getitem__(self, index: int | slice) -> str | _Online:
        if isinstance(index, slice):
            return _Online(self._ids, self._numbers[index], self._number_of)
        return self._ids[int(self._numbers[index])]

    def __iter__(self) -> Iterator[str]:
        return (self._ids[int(k)] for k in self._numbers)

    def _position(self, value: object) -> int:
        if not isinstance(value, str):
            return -1
        try:
            number = self._number_of(value)
        except KeyError:
            return -1
        position = int(np.searchsorted(self._numbers, number))
        return position if position < len(self._numbers) and self._numbers[position] == number else -1

    def __contains__(self, value: object) -> bool:
        return self._position(value) >= 0

    def index(self, value: object, start: int = 0, stop: int | None = None) -> int:
        position = self._position(value)
        if position < 0 or position not in range(*slice(start, stop).indices(len(self))):
            raise ValueError(f"{value!r} is not online")
        return position


@dataclass(frozen=True)
class SystemRound:
    """What the systems model did in one training round: when it started and how long it took (simulated
    seconds), how many clients were online, and how many were asked, late or dropped."""

    server_round: int
    start: float
    duration: float
    online: int
    asked: int
    late: int
    dropped: int


class SystemGrid:
    """A grid that applies availability, client speeds and a round deadline to the grid it wraps.

    ``data`` is the federation ``inner`` runs on; its ``client_ids`` are the registered clients, numbered in
    order from 0. The rules, on a simulated clock that starts at 0:

    - **Rounds.** The grid learns the round from each message's ``metadata["round"]``. ``client_ids()``
      answers for the round about to be configured: one after the highest round seen so far. So the
      evaluation of round ``r`` (which follows its training) sees round ``r + 1``'s online clients, the ones
      that are asked to train next.
    - **Availability.** With ``system.availability = p < 1`` each registered client is online in round ``r``
      with probability ``p``, drawn once per round from ``seed`` and ``r``. With ``system.availability_trace``
      a client is online when one of its intervals ``[start, end)`` contains the simulated time now, the
      start of that round; when nobody is, the clock first skips to the next interval's start (a quiet
      stretch of the trace costs no rounds). The online clients come back as a lazy sequence in registration order. With
      neither, ``client_ids()`` is ``inner.client_ids()``.
    - **Speed and deadline.** Client ``k`` has a fixed speed drawn from ``seed`` and ``k``: log-normal(0,
      ``speed_sigma``), or log-uniform in ``[1/speed_spread, 1]``, or 1.0 with neither. A ``fit`` instruction takes it
      ``local_steps(n, config) * seconds_per_step / speed`` simulated seconds for ``n`` training examples. If
      that exceeds ``system.deadline`` the client is late: it is not asked (it does no work) and is listed in
      ``Exchange.late``. Other messages (evaluation) pass through untouched.
    - **Clock.** A training exchange of round ``r`` starting at ``t_r`` ends at ``t_{r+1} = t_r + d_r``, where
      ``d_r`` is the deadline if any client was late, else the slowest replying client's time, else 0.

    ``clock`` is the simulated time now; ``history`` has one :class:`SystemRound` per training exchange.

    It is also an :class:`~fedloom.runtime.grid.AsyncGrid` on the same clock, for asynchronous algorithms:
    :meth:`submit` starts one client at the simulated time now (its reply is computed at once, on the model it
    was sent), and :meth:`next_reply` returns the submitted client that finishes first in simulated time
    (ties in the order submitted), moving the clock to that moment. A client slower than ``deadline`` comes
    back at the deadline with no reply. Submissions are not training exchanges: they add nothing to
    ``history``.

    Raises :class:`ConfigError` when the trace file cannot be used.

        system = SystemConfig(availability=0.3, speed_sigma=0.5, deadline=2.0)
        grid = SystemGrid(InlineGrid(task, data), data, system, seed=0)
        run_rounds(strategy=FedAvg(clients_per_round=1000), grid=grid, ...)
    """

    def __init__(self, inner: Grid, data: Federation, system: SystemConfig, *, seed: int = 0) -> None:
        if not isinstance(system, SystemConfig):
            raise ConfigError(f"system must be a SystemConfig, got {type(system).__name__}")
        self._inner = inner
        self._data = data
        self._system = system
        self._seed = int(seed)
        self._ids = data.client_ids
        self._number_of = _numbering(self._ids)
        self._trace = (
            AvailabilityTrace(system.availability_trace, len(self._ids)) if system.availability_trace else None
        )
        self._clock = 0.0
        self._last_round = 0
        # The online clients of (round, clock), kept because the loop asks for them twice a round.
        self._online: tuple[tuple[int, float], Sequence[str]] | None = None
        self._history: list[SystemRound] = []
        # Submitted clients (asynchronous use): (finish time, submission number, client id, reply or None).
        self._pending: list[tuple[float, int, str, Reply | None]] = []
        self._submitted = itertools.count()

    @property
    def clock(self) -> float:
        """Simulated seconds since the first round started: the start of the next round."""
        return self._clock

    @property
    def history(self) -> tuple[SystemRound, ...]:
        return tuple(self._history)

    @property
    def _filters_availability(self) -> bool:
        """Whether only some registered clients are online."""
        return self._trace is not None or self._system.availability < 1.0

    def client_ids(self) -> Sequence[str]:
        """The clients online for the round about to be configured (see the class docstring)."""
        if not self._filters_availability:
            return self._inner.client_ids()
        key = (self._last_round + 1, self._clock)
        if self._online is None or self._online[0] != key:
            mask = self._mask(key[0])
            if self._trace is not None and not mask.any():
                # Nobody is online now: simulated time skips to when the next client comes online, so a quiet
                # stretch of a trace (a night) costs no rounds instead of ending the run.
                until = self._trace.next_start(self._clock)
                if until is not None:
                    self._clock = until
                    key = (key[0], until)
                    mask = self._mask(key[0])
            self._online = (key, _Online(self._ids, np.flatnonzero(mask), self._number_of))
        return self._online[1]

    def _mask(self, server_round: int) -> npt.NDArray[np.bool_]:
        if self._trace is not None:
            return self._trace.online(self._clock)
        rng = np.random.default_rng([self._seed, _AVAILABILITY_SALT, server_round])
        mask: npt.NDArray[np.bool_] = rng.random(len(self._ids)) < self._system.availability
        return mask

    def speed(self, client_id: str) -> float:
        """Client ``client_id``'s fixed speed (1.0 is nominal; 0.5 takes twice as long)."""
        spread = self._system.speed_spread
        if self._system.speed_sigma == 0.0 and spread is None:
            return 1.0
        rng = np.random.default_rng([self._seed, _SPEED_SALT, self._number_of(client_id)])
        if spread is not None:
            return float(np.exp(-rng.uniform(0.0, math.log(spread))))
        return float(rng.lognormal(0.0, self._system.speed_sigma))

    def fit_seconds(self, client_id: str, message: Message) -> float:
        """The simulated seconds ``client_id`` takes for the ``fit`` instruction ``message``."""
        _kind, _round, _params, config = parse_instruction(message)
        if config is None:
            raise ConfigError(f"a {message.kind!r} message has no fit config")
        steps = local_steps(len(self._data.clients[client_id].train), config)
        return steps * self._system.seconds_per_step / self.speed(client_id)

    def send_and_receive(
        self, messages: Mapping[str, Message], timeout: float | None = None, on_reply: ReplyHandler | None = None
    ) -> Exchange:
        rounds = [r for m in messages.values() if isinstance(r := m.metadata.get("round"), int)]
        fits = {cid: m for cid, m in messages.items() if m.kind == MessageKind.FIT}
        if not fits:
            exchange = self._inner.send_and_receive(messages, timeout, on_reply)
            self._last_round = max([self._last_round, *rounds])
            return exchange

        deadline = self._system.deadline
        seconds = {cid: self.fit_seconds(cid, m) for cid, m in fits.items()}
        late = [cid for cid, s in seconds.items() if deadline is not None and s > deadline]
        left_out = set(late)
        passed = {cid: m for cid, m in messages.items() if cid not in left_out}
        exchange = self._inner.send_and_receive(passed, timeout) if passed else Exchange()
        replied = [seconds[cid] for cid in exchange.replies if cid in seconds]
        duration = float(deadline) if late and deadline is not None else max(replied, default=0.0)

        server_round = max(rounds, default=self._last_round + 1)
        online = len(self.client_ids()) if self._filters_availability else len(self._ids)
        self._history.append(
            SystemRound(server_round, self._clock, duration, online, len(fits), len(late), len(exchange.dropped))
        )
        self._clock += duration
        self._last_round = max(self._last_round, server_round)
        return hand_over(Exchange(exchange.replies, exchange.dropped, (*late, *exchange.late)), on_reply)

    def submit(self, client_id: str, message: Message) -> None:
        """Start ``client_id`` on ``message`` now, in simulated time (see the class docstring)."""
        seconds = self.fit_seconds(client_id, message) if message.kind == MessageKind.FIT else 0.0
        deadline = self._system.deadline
        reply: Reply | None = None
        if deadline is not None and seconds > deadline:
            seconds = float(deadline)  # late: it does no work, and the server gives up on it at the deadline
        else:
            reply = self._inner.send_and_receive({client_id: message}).replies.get(client_id)
        heapq.heappush(self._pending, (self._clock + seconds, next(self._submitted), client_id, reply))
        server_round = message.metadata.get("round")
        if isinstance(server_round, int):
            self._last_round = max(self._last_round, server_round)

    def next_reply(self) -> tuple[str, Reply | None]:
        """The submitted client that finishes first, and its reply (``None``: late or dropped); the clock moves
        to when it finished."""
        if not self._pending:
            raise RuntimeError("next_reply() with no client submitted")
        finish, _order, client_id, reply = heapq.heappop(self._pending)
        self._clock = max(self._clock, finish)
        return client_id, reply


def _numbering(ids: Sequence[str]) -> Callable[[str], int]:
    """``client id -> registration number``: parsed for :class:`ClientIds`, a dictionary otherwise."""
    if isinstance(ids, ClientIds) and (not ids or (ids.number(ids[0]) == 0 and ids.number(ids[-1]) == len(ids) - 1)):
        return ids.number  # numbers are positions: the ids of clients 0 .. len-1
    table: dict[Any, int] = {cid: k for k, cid in enumerate(ids)}

    def number(client_id: str) -> int:
        try:
            return table[client_id]
        except KeyError:
            raise KeyError(f"unknown client {client_id!r}") from None

    return number
