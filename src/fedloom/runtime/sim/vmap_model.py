"""What the vectorized backend knows about a model: whether it can train it exactly (the probe), and the
per-client loss and SGD step it vmaps. Split from :mod:`fedloom.runtime.sim.vectorized`, which drives them."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from fedloom.core.errors import ConfigError, DataError, user_code
from fedloom.data.base import ArrayData, Federation
from fedloom.task.torch_task import TorchTask

__all__ = [
    "NUMPY_DTYPES",
    "Arrays",
    "ProbedModel",
    "features",
    "first_sentence",
    "flat_data",
    "inspect_model",
    "per_example_loss",
    "step_function",
    "targets",
    "unsupported_reason",
]

_PROBE_CLIENTS = 64  # how many clients to look through for a training example to probe the model with

Arrays = dict[str, Tensor]
# The dtypes a model's state may have here: those with a NumPy twin, so that results go back without a cast.
NUMPY_DTYPES: Mapping[torch.dtype, np.dtype[Any]] = {
    t: np.dtype(str(t).removeprefix("torch."))
    for t in (torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64,
              torch.uint8, torch.bool)
}  # fmt: skip
PerExampleLoss = Callable[[Tensor, Tensor], Tensor]


# -- what the backend can run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbedModel:
    """The probed model and what training it costs: ``names`` are its state-dict keys in order, of which
    ``trainable`` SGD updates and ``frozen`` (buffers, frozen parameters) it passes through unchanged;
    ``state_bytes`` is the size of one state, and a batch of B examples saves about
    ``act_fixed + B * act_per_example`` bytes for the backward pass."""

    module: nn.Module
    names: tuple[str, ...]
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, np.dtype[Any]]
    state_bytes: int
    act_fixed: int
    act_per_example: int


def unsupported_reason(task: object, data: Federation) -> str | None:
    """None if :class:`VectorizedGrid` trains ``task`` exactly as ``task.fit`` would, else a one-line reason.

    Supported: a :class:`TorchTask` with the ``cross_entropy`` or ``bce`` loss and plain ``sgd`` (no
    ``optimizer_kwargs``), whose model keeps its buffers fixed in a training forward pass (no batch-norm
    running statistics), is deterministic in training mode (no dropout), runs under ``torch.func.vmap``
    (no data-dependent control flow, no ``.item()``) and gives the same gradients vmap'd as plain. The model
    is built on the CPU and probed on a few examples of the first client that has any (a few milliseconds
    for a small model, after torch's one-off imports). Raises :class:`JobError` when the model factory or its
    forward pass raises, and :class:`ConfigError` when the factory returns something other than a module.
    """
    return inspect_model(task, data)[1]


def inspect_model(task: object, data: Federation) -> tuple[ProbedModel | None, str | None]:
    """The probed model, or why the vectorized backend cannot run ``task`` (see :func:`unsupported_reason`)."""
    if not isinstance(task, TorchTask):
        return None, f"it needs a TorchTask, this is a {type(task).__name__}"
    if callable(task.loss):
        return None, "the loss is a callable; only the named losses 'cross_entropy' and 'bce' are vectorized"
    if callable(task.optimizer):
        return None, "the optimizer is a callable; only plain 'sgd' is vectorized"
    if task.optimizer != "sgd":
        return None, f"optimizer {task.optimizer!r}: only plain 'sgd' is vectorized"
    if task.optimizer_kwargs:
        return None, f"optimizer_kwargs {sorted(task.optimizer_kwargs)}: only plain 'sgd' without them is vectorized"
    with user_code("the model factory"), torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)  # as TorchTask builds it; the global RNG is restored on exit
        module = task.model()
    if not isinstance(module, nn.Module):
        raise ConfigError(f"the model factory returned {type(module).__name__}, not a torch.nn.Module")
    module = module.cpu()
    state = module.state_dict(keep_vars=True)
    if len(list(module.named_parameters(remove_duplicate=False))) != len(list(module.named_parameters())):
        return None, "the model ties (shares) parameters between modules"
    for name, tensor in state.items():
        if not isinstance(tensor, Tensor):
            return None, f"the model's state {name!r} is not a tensor"
        if tensor.dtype not in NUMPY_DTYPES:
            return (
                None,
                f"the model's state {name!r} has dtype {tensor.dtype}, which the vectorized backend does not run",
            )
    parameters = dict(module.named_parameters())
    trainable = tuple(n for n in state if n in parameters and parameters[n].requires_grad)
    sample = _probe_sample(task, data)
    if sample is None:
        return None, f"none of the first {_PROBE_CLIENTS} clients has training data to probe the model with"
    reason, act_fixed, act_per_example = _probe(module, trainable, task.loss, *sample)
    if reason is not None:
        return None, reason
    model = ProbedModel(
        module=module,
        names=tuple(state),
        trainable=trainable,
        frozen=tuple(n for n in state if n not in trainable),
        shapes={n: tuple(t.shape) for n, t in state.items()},
        dtypes={n: NUMPY_DTYPES[t.dtype] for n, t in state.items()},
        state_bytes=sum(t.numel() * t.element_size() for t in state.values()),
        act_fixed=act_fixed,
        act_per_example=act_per_example,
    )
    return model, None


def _probe_sample(task: TorchTask, data: Federation) -> tuple[Tensor, Tensor] | None:
    """Four training examples (repeated if the client has fewer) of the first client that has any."""
    for cid in itertools.islice(data.client_ids, _PROBE_CLIENTS):
        train = data.clients[cid].train
        if len(train):
            rows = np.arange(4) % len(train)
            x, y = features(train.x[rows]), targets(str(task.loss), train.y[rows])
            return torch.from_numpy(x), torch.from_numpy(y)
    return None


def _probe(
    module: nn.Module, trainable: tuple[str, ...], loss: str, x: Tensor, y: Tensor
) -> tuple[str | None, int, int]:
    """Why the model cannot be vectorized (or None), and its activation bytes: fixed, per example.

    Two clients with different params: A trains on examples 0-2 plus a masked padding example, B on all
    four. Their vmap'd gradients must equal plain autograd's; a forward pass that mixes examples (batch
    statistics) fails that because of A's padding.
    """
    module.train()
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    with user_code("the model's forward pass"), torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.default_generator.manual_seed(0)
        first, second = module(x), module(x)
    changed = [n for n, b in module.named_buffers() if not torch.equal(b, buffers[n])]
    if changed:
        return f"batch-norm running statistics (buffer {changed[0]!r}) change in a training forward pass", 0, 0
    if not isinstance(first, Tensor):
        return f"the model returns a {type(first).__name__}, not a tensor of logits", 0, 0
    if not torch.equal(first, second):
        return "the training forward pass is random (dropout?), so the clients cannot share one vmap batch", 0, 0

    state = {n: t.detach() for n, t in module.state_dict().items()}
    theta = [state, {n: t * 0.5 if n in trainable else t for n, t in state.items()}]
    rows = [torch.tensor([0, 1, 2]), torch.tensor([3, 0, 1, 2])]
    per_example = per_example_loss(loss)
    plain_grads: list[Arrays] = []
    plain_losses: list[Tensor] = []
    saved: list[int] = []
    for params, index in zip(theta, rows, strict=True):
        leaves = {n: t.clone().requires_grad_(n in trainable) for n, t in params.items()}
        with _saved_bytes() as counter, user_code("the model's forward pass"):
            value = per_example(functional_call(module, leaves, (x[index],)), y[index]).mean()
        saved.append(counter[0])
        wanted = [leaves[n] for n in trainable]
        grads = torch.autograd.grad(value, wanted, allow_unused=True) if wanted else ()
        plain_grads.append(
            {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(trainable, grads, strict=True)}
        )
        plain_losses.append(value.detach())
    act_per_example = max(saved[1] - saved[0], 0)
    act_fixed = max(saved[0] - 3 * act_per_example, 0)

    padding = x[3:4] * 3.0 + 1.0  # unlike any real example, so that a forward that mixes examples shows it
    xs = torch.stack([torch.cat([x[rows[0]], padding]), x[rows[1]]])
    ys = torch.stack([y, y[rows[1]]])
    masks = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    stacked = {n: torch.stack([theta[0][n], theta[1][n]]) for n in state}
    try:
        vmapped_grads, vmapped_losses = step_function(module, loss)(
            {n: stacked[n] for n in trainable}, {n: stacked[n] for n in state if n not in trainable}, xs, ys, masks
        )
    except Exception as exc:
        return f"torch.func.vmap cannot run the model: {first_sentence(exc)}", 0, 0
    for k in range(2):
        pairs = [(vmapped_grads[n][k], plain_grads[k][n]) for n in trainable]
        pairs.append((vmapped_losses[k], plain_losses[k]))
        if not all(torch.allclose(got, want, rtol=1e-4, atol=1e-6) for got, want in pairs):
            return "vmap'd gradients differ from plain autograd (does the forward pass mix examples?)", 0, 0
    return None, act_fixed, act_per_example


def first_sentence(exc: Exception) -> str:
    """The gist of an error for a one-line reason: its first line, cut at its first sentence if long."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if len(line) > 120 and ". " in line:
        line = line.split(". ")[0] + "."
    return line


@contextmanager
def _saved_bytes() -> Iterator[list[int]]:
    """Count the bytes autograd saves for the backward pass inside the block: the activations' memory."""
    total = [0]

    def pack(tensor: Tensor) -> Tensor:
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield total


# -- the arithmetic ------------------------------------------------------------------------------------------


def per_example_loss(loss: str) -> PerExampleLoss:
    """TorchTask's loss with ``reduction="none"``: its mean (or sum) over everything is TorchTask's value."""
    if loss == "cross_entropy":
        return lambda logits, targets: F.cross_entropy(logits, targets, reduction="none")
    return lambda logits, targets: F.binary_cross_entropy_with_logits(
        logits.reshape(targets.shape), targets, reduction="none"
    )


def step_function(module: nn.Module, loss: str) -> Callable[..., tuple[Arrays, Tensor]]:
    """``(trainable, frozen, x, y, mask) -> (grads, losses)`` over a leading client axis: each client's
    gradient of its mean loss over the examples where ``mask`` is 1 (``x``: ``[clients, batch, ...]``)."""
    per_example = per_example_loss(loss)

    def batch_loss(trainable: Arrays, frozen: Arrays, x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        losses = per_example(functional_call(module, (trainable, frozen), (x,)), y)
        weights = mask.reshape(mask.shape + (1,) * (losses.ndim - 1))
        items_per_example = losses.numel() // losses.shape[0]
        return (losses * weights).sum() / (mask.sum() * items_per_example)

    step: Callable[..., tuple[Arrays, Tensor]] = vmap(grad_and_value(batch_loss))
    return step


def features(x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    return np.array(x, dtype=np.float32, order="C")  # a writable copy: torch.from_numpy refuses read-only


def targets(loss: str, y: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Labels as TorchTask takes them: int64 class ids for cross-entropy, float32 for bce."""
    if loss == "cross_entropy":
        if len(y) and not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
            raise DataError(f"cross_entropy needs integer class ids as labels, got dtype {y.dtype}")
        return np.array(y, dtype=np.int64)
    return np.array(y, dtype=np.float32)


def flat_data(loss: str, splits: Sequence[ArrayData], device: torch.device) -> tuple[Tensor, Tensor]:
    """Every client's examples in one tensor, client after client, and the labels likewise."""
    shapes = {split.x.shape[1:] for split in splits}
    if len(shapes) > 1:
        raise DataError(f"the clients' examples have different shapes {sorted(shapes)}; one model cannot take them")
    x = features(np.concatenate([split.x for split in splits]))
    y = targets(loss, np.concatenate([split.y for split in splits]))
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
