"""``LogisticRegressionTask``: multinomial logistic regression in pure NumPy.

The task needs no torch, so a client (or a test) can run fedloom without it. It follows
:func:`fedloom.task.batching.minibatches`, as :class:`~fedloom.task.torch_task.TorchTask` does, so both visit
the same examples in the same order.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedloom.core.config import FitConfig
from fedloom.core.errors import ConfigError, DataError
from fedloom.core.params import Params
from fedloom.core.results import EvalResult, FitResult
from fedloom.data.base import ArrayData
from fedloom.task.batching import minibatches

__all__ = ["LogisticRegressionTask"]

_F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class LogisticRegressionTask:
    """Softmax regression over ``num_classes`` classes of ``num_features`` features (2 classes: binary).

    Params are ``{"weight": (num_classes, num_features), "bias": (num_classes,)}``, stored as float32 (like a
    torch ``nn.Linear``) and computed in float64. ``fit`` runs minibatch SGD on the mean cross-entropy plus
    ``l2 / 2 * ||weight||^2`` (the bias is not penalised) following :func:`minibatches`; its ``loss`` metric
    is the mean over steps of the batch cross-entropy, without the penalty. ``init_scale=0`` starts from
    zeros, otherwise from ``normal(0, init_scale)`` weights drawn from ``default_rng(seed)``.

    ``data.x`` may have any shape ``(N, ...)`` whose trailing axes hold ``num_features`` values; ``data.y``
    holds integer class ids in ``[0, num_classes)``. Wrong param names or shapes raise :class:`ConfigError`,
    unusable data raises :class:`DataError`.
    """

    num_features: int
    num_classes: int
    l2: float = 0.0
    init_scale: float = 0.0

    def __post_init__(self) -> None:
        if self.num_features < 1:
            raise ConfigError(f"num_features must be >= 1, got {self.num_features}")
        if self.num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.l2 < 0:
            raise ConfigError(f"l2 must be >= 0, got {self.l2}")
        if self.init_scale < 0:
            raise ConfigError(f"init_scale must be >= 0, got {self.init_scale}")

    def init_params(self, seed: int) -> Params:
        shape = (self.num_classes, self.num_features)
        if self.init_scale == 0:
            weight = np.zeros(shape, np.float32)
        else:
            weight = (np.random.default_rng(seed).standard_normal(shape) * self.init_scale).astype(np.float32)
        return Params({"weight": weight, "bias": np.zeros(self.num_classes, np.float32)})

    def fit(
        self,
        params: Params,
        data: ArrayData,
        config: FitConfig,
        *,
        anchor: Params | None = None,
        correction: Params | None = None,
        frozen: Collection[str] = (),
    ) -> FitResult:
        """Minibatch SGD from ``params``; ``config.proximal_mu``, ``anchor`` and ``correction`` add their terms to
        every step's gradient (see :class:`~fedloom.task.base.Task`), and ``weight`` or ``bias`` in ``frozen``
        keeps its value. Metrics: ``loss``, ``steps``."""
        unknown = [n for n in frozen if n not in ("weight", "bias")]
        if unknown:
            raise ConfigError(f"cannot freeze {unknown[:5]}: the model has only 'weight' and 'bias'")
        rate_w = 0.0 if "weight" in frozen else config.lr
        rate_b = 0.0 if "bias" in frozen else config.lr
        weight, bias = self._unpack(params)
        x, y = self._arrays(data)
        mu = config.proximal_mu
        anchor_w, anchor_b = self._unpack(params if anchor is None else anchor)
        shift_w, shift_b = (np.zeros_like(weight), np.zeros_like(bias))
        if correction is not None:
            shift_w, shift_b = self._unpack(correction, partial=True)
        total_loss = 0.0
        steps = 0
        for batch in minibatches(len(y), config):
            xb, yb = x[batch], y[batch]
            probs, loss = _softmax_loss(xb @ weight.T + bias, yb)
            probs[np.arange(len(yb)), yb] -= 1.0
            probs /= len(yb)  # now d(mean loss)/d(logits)
            grad_weight = probs.T @ xb
            grad_bias = probs.sum(axis=0)
            if self.l2:
                grad_weight += self.l2 * weight
            if mu:
                grad_weight += mu * (weight - anchor_w)
                grad_bias += mu * (bias - anchor_b)
            weight -= rate_w * (grad_weight + shift_w)
            bias -= rate_b * (grad_bias + shift_b)
            total_loss += loss
            steps += 1
        new = Params({"weight": weight.astype(np.float32), "bias": bias.astype(np.float32)})
        return FitResult(new, len(y), {"loss": total_loss / steps, "steps": float(steps)})

    def evaluate(self, params: Params, data: ArrayData) -> EvalResult:
        """Mean cross-entropy (no penalty) and ``accuracy``; empty data gives ``EvalResult(0.0, 0, {})``."""
        weight, bias = self._unpack(params)
        if len(data) == 0:
            return EvalResult(0.0, 0, {})
        x, y = self._arrays(data)
        logits = x @ weight.T + bias
        _, loss = _softmax_loss(logits, y)
        accuracy = float(np.mean(np.argmax(logits, axis=1) == y))
        return EvalResult(loss, len(y), {"accuracy": accuracy})

    def predict(self, params: Params, x: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        """Class probabilities (softmax) for the examples in ``x``: what ``fedloom serve`` answers with."""
        weight, bias = self._unpack(params)
        features = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        if features.shape[1] != self.num_features:
            raise DataError(f"expected {self.num_features} features per example, got x of shape {np.shape(x)}")
        logits = features @ weight.T + bias
        shifted: _F64 = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities: _F64 = shifted / shifted.sum(axis=1, keepdims=True)
        return probabilities

    def _unpack(self, params: Params, *, partial: bool = False) -> tuple[_F64, _F64]:
        """``weight`` and ``bias`` as float64 copies; ``partial``: a missing one is zeros (a correction)."""
        expected = {"weight": (self.num_classes, self.num_features), "bias": (self.num_classes,)}
        got = {name: tuple(array.shape) for name, array in params.items()}
        if got != expected and not (partial and all(expected.get(k) == v for k, v in got.items())):
            raise ConfigError(f"logistic regression expects params {expected}, got {got}")
        # astype copies, so training never touches the caller's (read-only) arrays.
        arrays = [params[k].astype(np.float64) if k in params else np.zeros(expected[k]) for k in ("weight", "bias")]
        return arrays[0], arrays[1]

    def _arrays(self, data: ArrayData) -> tuple[_F64, npt.NDArray[np.intp]]:
        n = len(data)
        x = np.asarray(data.x)
        if x.size != n * self.num_features:
            raise DataError(f"expected {self.num_features} features per example, got x of shape {x.shape}")
        y = np.asarray(data.y)
        if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
            raise DataError(f"labels must be integer class ids, got dtype {y.dtype}")
        if n and (y.min() < 0 or y.max() >= self.num_classes):
            raise DataError(f"labels must lie in [0, {self.num_classes}), got [{y.min()}, {y.max()}]")
        return x.reshape(n, self.num_features).astype(np.float64), y.astype(np.intp).reshape(n)


def _softmax_loss(logits: _F64, labels: npt.NDArray[Any]) -> tuple[_F64, float]:
    """Softmax probabilities (a new array) and the mean cross-entropy, computed stably."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    log_probs_true = shifted[np.arange(len(labels)), labels] - np.log(total[:, 0])
    return exp / total, float(-np.mean(log_probs_true))
