"""Server-side optimizers: how the server moves the global model along a round's aggregated update.

Each optimizer is a pure step over explicit state. The server hands it the global params ``x`` and the round's
``delta`` (the pseudo-gradient direction: the mean client model minus ``x``, so plain FedAvg is ``x + delta``):

>>> opt = Adam(eta=0.1)
>>> x = Params({"w": np.array([1.0], np.float32)})
>>> state = opt.init(x)
>>> x, state = opt.step(x, Params({"w": np.array([2.0], np.float32)}), state)
>>> list(state)
['m/w', 'v/w']

Only floating-point arrays are optimized and get state. Integer and bool arrays (batch-norm counters) become
``round(x + delta)``, which is FedAvg's rounded mean, and get none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from fedloom.core.errors import ConfigError
from fedloom.core.params import Params

__all__ = ["Adagrad", "Adam", "ServerOptimizer", "ServerSGD", "Yogi"]

_Array = npt.NDArray[np.float64]


class ServerOptimizer(Protocol):
    """A server optimizer as pure steps over an explicit state; nothing is kept on ``self``.

    - ``init(params)``: the state before round 1, a :class:`Params` of float64 arrays named
      ``"<slot>/<param name>"`` (``"m/w"``, ``"v/w"``), so that a checkpoint can store it.
    - ``step(params, delta, state)``: the new global params (each array in its own dtype, in the order of
      ``params``) and the new state. Raises :class:`ConfigError` when ``delta`` or ``state`` do not match
      ``params`` in names or shapes.
    """

    def init(self, params: Params) -> Params: ...

    def step(self, params: Params, delta: Params, state: Params) -> tuple[Params, Params]: ...


class _PerArrayOptimizer:
    """``init`` and ``step`` of an optimizer that updates each floating array on its own, given its slots.

    A subclass names its slots and their initial values (``_slots``) and updates one array in float64
    (``_update``); this class checks the inputs, leaves integer arrays to rounding, and casts back.
    """

    def _slots(self) -> dict[str, float]:
        raise NotImplementedError

    def _update(self, x: _Array, delta: _Array, slots: tuple[_Array, ...]) -> tuple[_Array, tuple[_Array, ...]]:
        raise NotImplementedError

    def init(self, params: Params) -> Params:
        """The state before round 1: every slot of every floating array filled with its initial value."""
        floating = [name for name, array in params.items() if _is_optimized(name, array)]
        state = {
            f"{slot}/{name}": np.full(params[name].shape, value, dtype=np.float64)
            for slot, value in self._slots().items()
            for name in floating
        }
        return Params(state, copy=False)  # fresh arrays of its own

    def step(self, params: Params, delta: Params, state: Params) -> tuple[Params, Params]:
        """One server update: ``(new params, new state)``. Computes in float64 and casts each array back to its
        dtype; integer and bool arrays become ``round(x + delta)``. Raises :class:`ConfigError` when ``delta``
        or ``state`` do not match ``params`` in names or shapes."""
        names = list(self._slots())
        floating = [name for name, array in params.items() if _is_optimized(name, array)]
        _check_matches("delta", delta, {name: array.shape for name, array in params.items()})
        _check_matches("state", state, {f"{slot}/{name}": params[name].shape for slot in names for name in floating})
        new_params: dict[str, npt.NDArray[Any]] = {}
        new_state: dict[str, _Array] = {}
        for name, array in params.items():
            x = array.astype(np.float64)
            d = delta[name].astype(np.float64)
            if not _is_optimized(name, array):
                new_params[name] = np.rint(x + d).astype(array.dtype)
                continue
            slots = tuple(state[f"{slot}/{name}"].astype(np.float64) for slot in names)
            x, slots = self._update(x, d, slots)
            new_params[name] = x.astype(array.dtype)
            new_state.update((f"{slot}/{name}", value) for slot, value in zip(names, slots, strict=True))
        order = [f"{slot}/{name}" for slot in names for name in floating]  # the order of init's state
        return Params(new_params, copy=False), Params({key: new_state[key] for key in order}, copy=False)


def _is_optimized(name: str, array: npt.NDArray[Any]) -> bool:
    """True for floating arrays, False for integer and bool ones; :class:`ConfigError` for anything else."""
    if np.issubdtype(array.dtype, np.floating):
        return True
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return False
    raise ConfigError(f"parameter {name!r} has dtype {array.dtype}; server optimizers need float, int or bool")


def _check_matches(what: str, given: Params, expected: dict[str, tuple[int, ...]]) -> None:
    """Raise :class:`ConfigError` unless ``given`` has exactly the names of ``expected``, with those shapes."""
    missing = [name for name in expected if name not in given]
    unexpected = [name for name in given if name not in expected]
    if missing or unexpected:
        raise ConfigError(f"{what} does not match params: missing {missing}, unexpected {unexpected}")
    for name, shape in expected.items():
        if given[name].shape != shape:
            raise ConfigError(f"{what}[{name!r}] has shape {given[name].shape} but the params need {shape}")


@dataclass(frozen=True)
class ServerSGD(_PerArrayOptimizer):
    """Server SGD with momentum: FedAvgM of Hsu, Qi and Brown 2019, "Measuring the Effects of Non-Identical
    Data Distribution for Federated Visual Classification".

    ``v <- momentum * v + delta; x <- x + lr * v``, with ``v`` starting at 0. The paper writes it with the
    pseudo-gradient ``x - mean``, whose sign is the opposite of ``delta``'s. With ``lr=1, momentum=0`` (the
    defaults) this is exactly FedAvg: ``x + delta`` in float64, cast back. Without momentum there is nothing
    to remember, so the state is empty; otherwise it holds ``"momentum/<name>"``.

    Raises :class:`ConfigError` unless ``lr > 0`` and ``0 <= momentum < 1``.
    """

    lr: float = 1.0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"ServerSGD lr must be finite and > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"ServerSGD momentum must be in [0, 1), got {self.momentum}")

    def _slots(self) -> dict[str, float]:
        return {"momentum": 0.0} if self.momentum else {}

    def _update(self, x: _Array, delta: _Array, slots: tuple[_Array, ...]) -> tuple[_Array, tuple[_Array, ...]]:
        if not self.momentum:
            return x + self.lr * delta, ()
        velocity = self.momentum * slots[0] + delta
        return x + self.lr * velocity, (velocity,)


class _Adaptive(_PerArrayOptimizer):
    """FedAdagrad, FedAdam and FedYogi: Algorithm 2 of Reddi et al. 2021, "Adaptive Federated Optimization"
    (ICLR). They differ only in the second moment ``v`` (:meth:`_second_moment`); the rest is shared:

    ``m_t = beta1 m_{t-1} + (1 - beta1) delta``, ``x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)``.

    There is no bias correction, as in the paper. ``m`` starts at 0 and ``v`` at ``tau^2``: the paper requires
    ``v_{-1} >= tau^2``, and ``tau`` (the adaptivity) bounds how large a step a tiny ``v`` allows.
    """

    eta: float
    beta1: float
    tau: float

    def _check(self) -> None:
        name = type(self).__name__
        if not (math.isfinite(self.eta) and self.eta > 0):
            raise ConfigError(f"{name} eta must be finite and > 0, got {self.eta}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ConfigError(f"{name} tau must be finite and > 0, got {self.tau}")
        if not 0 <= self.beta1 < 1:
            raise ConfigError(f"{name} beta1 must be in [0, 1), got {self.beta1}")

    def _slots(self) -> dict[str, float]:
        return {"m": 0.0, "v": self.tau**2}

    def _second_moment(self, v: _Array, delta_squared: _Array) -> _Array:
        raise NotImplementedError

    def _update(self, x: _Array, delta: _Array, slots: tuple[_Array, ...]) -> tuple[_Array, tuple[_Array, ...]]:
        m, v = slots
        m = self.beta1 * m + (1 - self.beta1) * delta
        v = self._second_moment(v, np.square(delta))
        return x + self.eta * m / (np.sqrt(v) + self.tau), (m, v)


def _check_beta2(name: str, beta2: float) -> None:
    if not 0 <= beta2 < 1:
        raise ConfigError(f"{name} beta2 must be in [0, 1), got {beta2}")


@dataclass(frozen=True)
class Adagrad(_Adaptive):
    """FedAdagrad (Reddi et al. 2021, Algorithm 2): ``v_t = v_{t-1} + delta^2``.

    State: ``"m/<name>"`` (starts at 0) and ``"v/<name>"`` (starts at ``tau^2``). Raises :class:`ConfigError`
    unless ``eta > 0``, ``tau > 0`` and ``0 <= beta1 < 1``.
    """

    eta: float = 0.01
    beta1: float = 0.0
    tau: float = 1e-3

    def __post_init__(self) -> None:
        self._check()

    def _second_moment(self, v: _Array, delta_squared: _Array) -> _Array:
        return v + delta_squared


@dataclass(frozen=True)
class Adam(_Adaptive):
    """FedAdam (Reddi et al. 2021, Algorithm 2): ``v_t = beta2 v_{t-1} + (1 - beta2) delta^2``.

    State: ``"m/<name>"`` (starts at 0) and ``"v/<name>"`` (starts at ``tau^2``). Raises :class:`ConfigError`
    unless ``eta > 0``, ``tau > 0``, ``0 <= beta1 < 1`` and ``0 <= beta2 < 1``.
    """

    eta: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        self._check()
        _check_beta2("Adam", self.beta2)

    def _second_moment(self, v: _Array, delta_squared: _Array) -> _Array:
        return self.beta2 * v + (1 - self.beta2) * delta_squared


@dataclass(frozen=True)
class Yogi(_Adaptive):
    """FedYogi (Reddi et al. 2021, Algorithm 2): ``v_t = v_{t-1} - (1 - beta2) delta^2 sign(v_{t-1} - delta^2)``.

    Each round ``v`` moves by ``(1 - beta2) delta^2`` towards ``delta^2``, however far away it is, where Adam's
    moves by ``(1 - beta2) (delta^2 - v)``: a large ``v`` is forgotten more slowly (Zaheer et al. 2018,
    "Adaptive Methods for Nonconvex Optimization"). State: ``"m/<name>"`` (starts at 0) and ``"v/<name>"``
    (starts at ``tau^2``). Raises :class:`ConfigError` unless ``eta > 0``, ``tau > 0``,
    ``0 <= beta1 < 1`` and ``0 <= beta2 < 1``.
    """

    eta: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        self._check()
        _check_beta2("Yogi", self.beta2)

    def _second_moment(self, v: _Array, delta_squared: _Array) -> _Array:
        return v - (1 - self.beta2) * delta_squared * np.sign(v - delta_squared)
