"""``TorchTask``: a client that trains a PyTorch model with minibatch SGD.

This is the only module of fedloom's lower layers that imports torch; conversions between ``Params`` and
torch state dicts live here. Training follows :func:`fedloom.task.batching.minibatches`, so a
``TorchTask`` and a :class:`~fedloom.task.numpy_task.LogisticRegressionTask` on the same config visit the
same examples in the same order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from fedloom.core.config import FitConfig
from fedloom.core.errors import ConfigError, DataError
from fedloom.core.params import Params
from fedloom.core.results import EvalResult, FitResult
from fedloom.data.base import ArrayData
from fedloom.task.batching import minibatches

__all__ = ["TorchTask"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]

_LOSSES = ("cross_entropy", "bce")
_OPTIMIZERS: Mapping[str, Callable[..., torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
# Tensors of these dtypes can be written through a NumPy view, which is the cheapest way to load params.
_NUMPY_VIEWABLE = frozenset(
    {torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64,
     torch.uint8, torch.bool}
)  # fmt: skip


@dataclass(frozen=True)
class TorchTask:
    """Train and evaluate the module built by ``model()`` (a factory, called once per thread and cached).

    - ``loss``: ``"cross_entropy"`` (integer class ids, ``C >= 2`` logits), ``"bce"`` (binary cross-entropy
      with logits for a single-logit model, labels 0/1), or a callable ``(logits, targets) -> mean loss``;
      a callable gets int64 targets for integer labels and float32 targets otherwise.
    - ``optimizer``: ``"sgd"`` or ``"adam"`` with ``optimizer_kwargs`` (``momentum``, ``weight_decay``...),
      or a callable ``(parameters, lr) -> torch.optim.Optimizer``. A fresh optimizer (no carried state) is
      made for every ``fit``.
    - ``eval_batch_size``: batch size of ``evaluate``; ``device``: where the model and data live.

    ``Params`` names are the model's ``state_dict`` keys, in its order, buffers included. ``fit`` and
    ``evaluate`` load params strictly (same names and shapes, else :class:`ConfigError`); neither mutates
    its input nor touches torch's global random state, and on CPU both are bit-for-bit deterministic.
    The cached module's state is overwritten on every call, so the factory should keep all of a model's
    state in parameters and buffers.

    >>> task = TorchTask(lambda: nn.Linear(4, 3))
    >>> list(task.init_params(seed=0))
    ['weight', 'bias']
    """

    model: Callable[[], nn.Module]
    loss: str | LossFn = "cross_entropy"
    optimizer: str | OptimizerFactory = "sgd"
    optimizer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    eval_batch_size: int = 1024
    device: str = "cpu"
    # Per-thread cache of the built module: building one costs more than a small fit itself.
    _cache: threading.local = field(default_factory=threading.local, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not callable(self.model) or isinstance(self.model, nn.Module):
            raise ConfigError("model must be a factory returning a torch.nn.Module, e.g. lambda: MyNet()")
        if isinstance(self.loss, str) and self.loss not in _LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; choose one of {', '.join(_LOSSES)} or a callable")
        if isinstance(self.optimizer, str) and self.optimizer not in _OPTIMIZERS:
            raise ConfigError(
                f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(_OPTIMIZERS)} or a callable"
            )
        if callable(self.optimizer) and self.optimizer_kwargs:
            raise ConfigError("optimizer_kwargs apply to a named optimizer; bind them in your callable instead")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        try:
            torch.device(self.device)
        except RuntimeError as exc:
            raise ConfigError(f"invalid device {self.device!r}: {exc}") from None
        object.__setattr__(self, "optimizer_kwargs", dict(self.optimizer_kwargs))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_cache"]  # a thread-local module cache does not travel to another process
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _cache=threading.local())

    # -- the Task protocol -------------------------------------------------------------------------------

    def init_params(self, seed: int) -> Params:
        """The factory's initial weights under ``seed`` (global RNG untouched)."""
        module = self._build(seed)
        self._cache.module = module
        return _to_params(module)

    def describe_layers(self) -> dict[str, str]:
        """The model's layers (its modules without submodules) by name, each as its ``repr``: ``{"0":
        "Linear(in_features=64, out_features=32, bias=True)", "1": "ReLU()", ...}`` (``"(root)"`` for a model
        that is one layer). A deployment's job digest holds them beside the parameters' shapes, so that a changed
        activation, which keeps every shape, is a changed job too. What ``forward`` does beyond its layers is
        not in them."""
        module = self._module()
        leaves = ((name, leaf) for name, leaf in module.named_modules() if next(leaf.children(), None) is None)
        return {name or "(root)": repr(leaf) for name, leaf in leaves}

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
        """Train a copy of ``params`` on ``data``; metrics: ``loss`` (mean batch loss over steps, without the
        proximal term), ``steps``. ``config.proximal_mu``, ``anchor`` and ``correction`` change each step's
        gradient as :class:`~fedloom.task.base.Task` says; the parameters named in ``frozen`` are not trained
        (buffers, such as batch-norm statistics, still update in training mode).

        Raises :class:`DataError` for empty data and :class:`ConfigError` for params (or an anchor or
        correction, or a frozen name) that do not fit the model.
        """
        n = len(data)
        if n == 0:
            raise DataError("cannot fit on an empty dataset (0 examples)")
        module = self._module()
        _load(module, params)
        with _frozen(module, frozen):
            return self._train(module, params, data, config, anchor, correction)

    def _train(
        self,
        module: nn.Module,
        params: Params,
        data: ArrayData,
        config: FitConfig,
        anchor: Params | None,
        correction: Params | None,
    ) -> FitResult:
        n = len(data)
        x = self._features(data.x)
        y = self._targets(data.y)
        loss_fn = self._loss_fn("mean")
        module.train()
        module.zero_grad(set_to_none=True)  # a fit that raised half-way may have left gradients behind
        step = self._stepper(module, config.lr)
        terms = _gradient_terms(module, config.proximal_mu, params if anchor is None else anchor, correction)
        total_loss = 0.0
        steps = 0
        with self._seeded(config.seed), torch.enable_grad():
            for batch in minibatches(n, config):
                index = torch.from_numpy(batch).to(x.device)
                loss = loss_fn(module(x.index_select(0, index)), y.index_select(0, index))
                torch.autograd.backward(loss)
                if terms is not None:
                    terms()
                step()
                total_loss += loss.item()
                steps += 1
        return FitResult(_to_params(module), n, {"loss": total_loss / steps, "steps": float(steps)})

    def evaluate(self, params: Params, data: ArrayData) -> EvalResult:
        """Mean loss over examples and ``accuracy`` (argmax, or ``logit > 0`` for one logit), in eval mode.

        Empty data gives ``EvalResult(0.0, 0, {})``, which weighted averages over clients ignore.
        ``accuracy`` is left out where the labels are not one class id per example (a callable loss on
        float targets, such as a regression).
        """
        n = len(data)
        if n == 0:
            return EvalResult(0.0, 0, {})
        module = self._module()
        _load(module, params)
        x = self._features(data.x)
        y = self._targets(data.y)
        loss_fn = self._loss_fn("sum")
        module.eval()
        total_loss = 0.0
        correct = 0
        has_accuracy = isinstance(self.loss, str) or _is_integer(data.y)
        with self._seeded(0), torch.no_grad():
            for start in range(0, n, self.eval_batch_size):
                logits = module(x[start : start + self.eval_batch_size])
                targets = y[start : start + self.eval_batch_size]
                total_loss += loss_fn(logits, targets).item()
                if has_accuracy:
                    hits = _hits(logits, targets)
                    has_accuracy = hits is not None
                    correct += hits or 0
        metrics = {"accuracy": correct / n} if has_accuracy else {}
        return EvalResult(total_loss / n, n, metrics)

    def predict(self, params: Params, x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """The model's outputs for the examples in ``x`` under ``params``, in eval mode: class probabilities for
        ``cross_entropy`` (softmax), the probability of class 1 for ``bce`` (sigmoid), the raw outputs for a
        callable loss. What ``fedloom serve`` answers with."""
        module = self.module_with(params)
        features = self._features(x)
        parts = []
        with self._seeded(0), torch.no_grad():
            for start in range(0, len(features), self.eval_batch_size):
                outputs = module(features[start : start + self.eval_batch_size])
                if self.loss == "cross_entropy":
                    outputs = torch.softmax(outputs, dim=1)
                elif self.loss == "bce":
                    outputs = torch.sigmoid(outputs.reshape(len(outputs)))
                parts.append(outputs.float().cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros((0,), np.float32)

    def module_with(self, params: Params) -> nn.Module:
        """This thread's model with ``params`` loaded, in eval mode (for prediction and export). Raises
        :class:`ConfigError` for params that do not fit it."""
        module = self._module()
        _load(module, params)
        return module.eval()

    # -- helpers -------------------------------------------------------------------------------------------

    @contextmanager
    def _seeded(self, seed: int) -> Iterator[None]:
        """Seed torch's RNG (dropout, init) for the block, and restore the caller's RNG state afterwards."""
        device_type = torch.device(self.device).type
        if device_type == "cpu":
            with torch.random.fork_rng(devices=[]):
                # torch.manual_seed would also seed (and not restore) every accelerator, and costs ~100 us.
                torch.default_generator.manual_seed(seed)
                yield
        else:
            with torch.random.fork_rng(device_type=device_type):
                torch.manual_seed(seed)
                yield

    def _build(self, seed: int) -> nn.Module:
        with self._seeded(seed):
            module = self.model()
        if not isinstance(module, nn.Module):
            raise ConfigError(f"the model factory returned {type(module).__name__}, not a torch.nn.Module")
        return module.to(self.device)

    def _module(self) -> nn.Module:
        module: nn.Module | None = getattr(self._cache, "module", None)
        if module is None:
            module = self._build(0)  # its initial weights are overwritten by every fit and evaluate
            self._cache.module = module
        return module

    def _features(self, x: npt.NDArray[Any]) -> torch.Tensor:
        array = np.ascontiguousarray(x, dtype=np.float32)  # no copy when x already is
        if not array.flags.writeable:
            array = array.copy()  # torch.from_numpy warns about read-only arrays
        return torch.from_numpy(array).to(self.device)

    def _targets(self, y: npt.NDArray[Any]) -> torch.Tensor:
        if self.loss == "cross_entropy" and len(y) and not _is_integer(y):
            raise DataError(f"cross_entropy needs integer class ids as labels, got dtype {y.dtype}")
        if self.loss == "cross_entropy" or (callable(self.loss) and _is_integer(y)):
            return torch.tensor(np.asarray(y, dtype=np.int64), device=self.device)
        return torch.tensor(np.asarray(y, dtype=np.float32), device=self.device)

    def _loss_fn(self, reduction: str) -> LossFn:
        """The loss with ``reduction`` ``"mean"`` or ``"sum"`` over the batch."""
        if callable(self.loss):
            user = self.loss
            if reduction == "mean":
                return user
            return lambda logits, targets: user(logits, targets) * len(targets)
        if self.loss == "cross_entropy":
            return lambda logits, targets: F.cross_entropy(logits, targets, reduction=reduction)
        return lambda logits, targets: F.binary_cross_entropy_with_logits(
            logits.reshape(targets.shape), targets, reduction=reduction
        )

    def _stepper(self, module: nn.Module, lr: float) -> Callable[[], None]:
        """One optimizer step that also clears the gradients, from a fresh optimizer."""
        if self.optimizer == "sgd" and not self.optimizer_kwargs:
            # Plain SGD by hand: the same update as torch.optim.SGD (param.add_(grad, alpha=-lr)), bit for
            # bit, without its per-step bookkeeping, which costs more than a small model's backward pass.
            trainable = [p for p in module.parameters() if p.requires_grad]

            def sgd_step() -> None:
                with torch.no_grad():
                    for p in trainable:
                        if p.grad is not None:
                            p.add_(p.grad, alpha=-lr)
                            p.grad = None

            return sgd_step
        optimizer = self._optimizer(module.parameters(), lr)

        def step() -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def _optimizer(self, parameters: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """A fresh instance of the configured optimizer over ``parameters`` (also used by wrappers such as
        :class:`~fedloom.privacy.DPSGDTask`, which wrap it in their own optimizer)."""
        if callable(self.optimizer):
            return self.optimizer(parameters, lr)
        return _OPTIMIZERS[self.optimizer](parameters, lr=lr, **self.optimizer_kwargs)


@contextmanager
def _frozen(module: nn.Module, names: Collection[str]) -> Iterator[None]:
    """``module`` with the parameters ``names`` not requiring gradients, restored afterwards."""
    if not names:
        yield
        return
    parameters = dict(module.named_parameters())
    state = module.state_dict()
    unknown = [n for n in names if n not in parameters and n not in state]
    if unknown:
        raise ConfigError(f"cannot freeze {unknown[:5]}: the model has no such parameter")
    before = {n: parameters[n].requires_grad for n in names if n in parameters}  # buffers are never trained
    try:
        for n in before:
            parameters[n].requires_grad_(False)
        yield
    finally:
        for n, required in before.items():
            parameters[n].requires_grad_(required)


def _gradient_terms(
    module: nn.Module, mu: float, anchor: Params, correction: Params | None
) -> Callable[[], None] | None:
    """What adds ``mu * (w - anchor) + correction`` to the gradient of each trainable floating-point parameter
    (see :class:`~fedloom.task.base.Task`), or None where there is nothing to add."""
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad and p.is_floating_point()]

    def tensors(source: Params, what: str) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in trainable:
            if name not in source:
                if what == "anchor":
                    raise ConfigError(f"the proximal anchor has no parameter {name!r}")
                continue
            if tuple(source[name].shape) != tuple(p.shape):
                raise ConfigError(
                    f"{what} {name!r} has shape {tuple(source[name].shape)}, the model expects {tuple(p.shape)}"
                )
            out[name] = torch.tensor(np.asarray(source[name]), dtype=p.dtype, device=p.device)
        return out

    anchors = tensors(anchor, "anchor") if mu > 0 else {}
    corrections = tensors(correction, "correction") if correction is not None else {}
    if not anchors and not corrections:
        return None

    def add() -> None:
        with torch.no_grad():
            for name, p in trainable:
                if p.grad is None:
                    continue
                if name in anchors:
                    p.grad.add_(p - anchors[name], alpha=mu)
                if name in corrections:
                    p.grad.add_(corrections[name])

    return add


def _load(module: nn.Module, params: Params) -> None:
    """Copy ``params`` into ``module``'s parameters and buffers in place; names and shapes must match."""
    state = module.state_dict()
    missing = [name for name in state if name not in params]
    unexpected = [name for name in params if name not in state]
    if missing or unexpected:
        raise ConfigError(
            f"params do not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in state.items():
        array = params[name]
        if tuple(array.shape) != tuple(tensor.shape):
            expected = tuple(tensor.shape)
            raise ConfigError(f"param {name!r} has shape {tuple(array.shape)}, the model expects {expected}")
        if tensor.device.type == "cpu" and tensor.dtype in _NUMPY_VIEWABLE:
            tensor.numpy()[...] = array  # one copy, casting to the model's dtype
        else:
            tensor.copy_(torch.tensor(array))


def _to_params(module: nn.Module) -> Params:
    """``module``'s state dict as ``Params`` (Params copies, so the module can keep training)."""
    arrays = {}
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu()
        if tensor.dtype not in _NUMPY_VIEWABLE:
            tensor = tensor.float()  # bfloat16 and friends have no NumPy dtype
        arrays[name] = tensor.numpy()
    return Params(arrays)


def _is_integer(array: npt.NDArray[Any]) -> bool:
    return bool(np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_)


def _hits(logits: torch.Tensor, targets: torch.Tensor) -> int | None:
    """How many predictions match ``targets``; None where targets are not one class id per example."""
    if targets.numel() != len(logits):
        return None
    if logits.ndim == 2 and logits.shape[1] >= 2:
        predictions = logits.argmax(dim=1)
    elif logits.numel() == len(logits):
        predictions = (logits > 0).reshape(len(logits))
    else:
        return None
    return int((predictions == targets.reshape(len(logits)).long()).sum().item())
