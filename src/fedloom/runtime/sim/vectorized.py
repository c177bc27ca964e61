"""The vectorized simulation grid: a round's clients train in lockstep, as one ``torch.func.vmap`` batch.

Each client's parameters are one slice of tensors stacked along a leading client axis. Every local SGD step
gathers each client's own minibatch (the one :func:`~fedloom.task.batching.minibatches` gives it) from one
flat data tensor, pads the batches to the widest, and takes one ``vmap(grad_and_value(functional_call))``
step for all of them, with the loss masked so that each client's loss is the mean over its real examples.
The result is what :meth:`TorchTask.fit <fedloom.task.torch_task.TorchTask.fit>` computes for each client
alone, to float tolerance, at about the cost of centralized training of the same SGD steps.

That holds only for models whose examples do not interact and whose training forward pass is deterministic,
and for plain SGD: :func:`unsupported_reason` probes a task and says why not, and the backend selection
then falls back to another backend.
"""

from __future__ import annotations

import itertools
import logging
import time
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

from fedloom.core.codec import encoded_size
from fedloom.core.errors import ConfigError, DataError, user_code
from fedloom.core.message import Message, MessageKind
from fedloom.core.params import Params
from fedloom.core.results import EvalResult, FitResult, parse_instruction
from fedloom.data.base import ArrayData, Federation
from fedloom.runtime.grid import Exchange, Reply
from fedloom.runtime.sim.common import drops
from fedloom.task.batching import minibatches
from fedloom.task.torch_task import TorchTask

__all__ = ["VectorizedGrid", "unsupported_reason"]

log = logging.getLogger("fedloom.runtime.vectorized")

_CPU_BUDGET_MB = 1024
_GPU_FREE_SHARE = 0.8  # of the GPU's free memory, when no budget is given
_SAFETY = 2.0  # on top of the estimated working set: allocator slack, vmap's temporaries
_PROBE_CLIENTS = 64  # how many clients to look through for a training example to probe the model with

Arrays = dict[str, Tensor]
# The dtypes a model's state may have here: those with a NumPy twin, so that results go back without a cast.
_NUMPY_DTYPES: Mapping[torch.dtype, np.dtype[Any]] = {
    t: np.dtype(str(t).removeprefix("torch."))
    for t in (torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64,
              torch.uint8, torch.bool)
}  # fmt: skip
PerExampleLoss = Callable[[Tensor, Tensor], Tensor]


# -- what the backend can run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Model:
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
    return _inspect(task, data)[1]


def _inspect(task: object, data: Federation) -> tuple[_Model | None, str | None]:
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
        if tensor.dtype not in _NUMPY_DTYPES:
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
    model = _Model(
        module=module,
        names=tuple(state),
        trainable=trainable,
        frozen=tuple(n for n in state if n not in trainable),
        shapes={n: tuple(t.shape) for n, t in state.items()},
        dtypes={n: _NUMPY_DTYPES[t.dtype] for n, t in state.items()},
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
            x, y = _features(train.x[rows]), _targets(str(task.loss), train.y[rows])
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
    per_example = _per_example_loss(loss)
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
        vmapped_grads, vmapped_losses = _step_function(module, loss)(
            {n: stacked[n] for n in trainable}, {n: stacked[n] for n in state if n not in trainable}, xs, ys, masks
        )
    except Exception as exc:
        return f"torch.func.vmap cannot run the model: {_first_sentence(exc)}", 0, 0
    for k in range(2):
        pairs = [(vmapped_grads[n][k], plain_grads[k][n]) for n in trainable]
        pairs.append((vmapped_losses[k], plain_losses[k]))
        if not all(torch.allclose(got, want, rtol=1e-4, atol=1e-6) for got, want in pairs):
            return "vmap'd gradients differ from plain autograd (does the forward pass mix examples?)", 0, 0
    return None, act_fixed, act_per_example


def _first_sentence(exc: Exception) -> str:
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


def _per_example_loss(loss: str) -> PerExampleLoss:
    """TorchTask's loss with ``reduction="none"``: its mean (or sum) over everything is TorchTask's value."""
    if loss == "cross_entropy":
        return lambda logits, targets: F.cross_entropy(logits, targets, reduction="none")
    return lambda logits, targets: F.binary_cross_entropy_with_logits(
        logits.reshape(targets.shape), targets, reduction="none"
    )


def _step_function(module: nn.Module, loss: str) -> Callable[..., tuple[Arrays, Tensor]]:
    """``(trainable, frozen, x, y, mask) -> (grads, losses)`` over a leading client axis: each client's
    gradient of its mean loss over the examples where ``mask`` is 1 (``x``: ``[clients, batch, ...]``)."""
    per_example = _per_example_loss(loss)

    def batch_loss(trainable: Arrays, frozen: Arrays, x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        losses = per_example(functional_call(module, (trainable, frozen), (x,)), y)
        weights = mask.reshape(mask.shape + (1,) * (losses.ndim - 1))
        items_per_example = losses.numel() // losses.shape[0]
        return (losses * weights).sum() / (mask.sum() * items_per_example)

    step: Callable[..., tuple[Arrays, Tensor]] = vmap(grad_and_value(batch_loss))
    return step


def _features(x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    return np.array(x, dtype=np.float32, order="C")  # a writable copy: torch.from_numpy refuses read-only


def _targets(loss: str, y: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Labels as TorchTask takes them: int64 class ids for cross-entropy, float32 for bce."""
    if loss == "cross_entropy":
        if len(y) and not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
            raise DataError(f"cross_entropy needs integer class ids as labels, got dtype {y.dtype}")
        return np.array(y, dtype=np.int64)
    return np.array(y, dtype=np.float32)


def _flat(loss: str, splits: Sequence[ArrayData], device: torch.device) -> tuple[Tensor, Tensor]:
    """Every client's examples in one tensor, client after client, and the labels likewise."""
    shapes = {split.x.shape[1:] for split in splits}
    if len(shapes) > 1:
        raise DataError(f"the clients' examples have different shapes {sorted(shapes)}; one model cannot take them")
    x = _features(np.concatenate([split.x for split in splits]))
    y = _targets(loss, np.concatenate([split.y for split in splits]))
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


# -- the grid ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """One client's instruction: its params and data, and for a fit its learning rate and minibatches."""

    client_id: str
    params: Params
    data: ArrayData
    lr: float = 0.0
    batches: tuple[npt.NDArray[np.intp], ...] = ()


class VectorizedGrid:
    """Simulated clients of a :class:`TorchTask` run in this process, in lockstep on ``device``.

    Fit replies equal ``task.fit``'s (params to float tolerance, ``loss``, ``steps``, ``num_examples``) and
    evaluate replies ``task.evaluate``'s; dropouts follow the rule every backend shares
    (:func:`~fedloom.runtime.sim.common.drops`). Clients are trained in chunks whose estimated working set
    fits ``memory_budget_mb`` (default: 1024 MiB on CPU, 80% of the free memory on a GPU); clients with
    similar step counts share a chunk, and a client that has done its steps leaves the batch.

    Byte counts are exact wire sizes, computed without encoding every message: a message's encoded size is
    its params' part (which depends only on names, dtypes and shapes, so it is computed once per model) plus
    its metadata's part. Replies are handed to the loop as messages, not decoded from bytes; the loop
    validates every update anyway. ``seconds`` is a chunk's wall time shared equally among its clients.

    Raises :class:`ConfigError` when :func:`unsupported_reason` gives a reason, or when ``device`` is CUDA
    and torch sees no GPU; :class:`JobError` when the model raises. ``device=None`` means ``task.device``.
    """

    def __init__(
        self,
        task: TorchTask,
        data: Federation,
        *,
        dropout: float = 0.0,
        seed: int = 0,
        device: str | None = None,
        memory_budget_mb: int | None = None,
    ) -> None:
        name = device if device is not None else getattr(task, "device", "cpu")
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("CUDA was asked for (--device cuda) but torch sees no GPU")
        model, reason = _inspect(task, data)
        if model is None:
            raise ConfigError(f"the vectorized backend cannot run this task: {reason}")
        self._task = task
        self._data = data
        self._dropout = dropout
        self._seed = seed
        self._device = torch.device(name)
        self._budget_mb = memory_budget_mb
        self._loss = str(task.loss)
        self._model = model
        self._module = model.module.to(self._device)
        self._step = _step_function(self._module, self._loss)

        def forward(state: Arrays, x: Tensor) -> Tensor:
            logits: Tensor = functional_call(self._module, state, (x,))
            return logits

        # Per-client params, or one params object shared by every client (FedAvg's evaluation).
        self._forward: Callable[[Arrays, Tensor], Tensor] = vmap(forward)
        self._forward_shared: Callable[[Arrays, Tensor], Tensor] = vmap(forward, in_dims=(None, 0))

    def client_ids(self) -> Sequence[str]:
        return self._data.client_ids

    def send_and_receive(self, messages: Mapping[str, Message], timeout: float | None = None) -> Exchange:
        dropped: list[str] = []
        fits: list[_Job] = []
        evaluations: list[_Job] = []
        for cid, message in messages.items():
            if drops(self._seed, self._dropout, cid, message):
                dropped.append(cid)
                continue
            kind, _round, params, config = parse_instruction(message)
            client = self._data.clients[cid]
            if kind == MessageKind.FIT:
                assert config is not None
                if len(client.train) == 0:
                    raise DataError("cannot fit on an empty dataset (0 examples)")
                batches = tuple(minibatches(len(client.train), config))
                fits.append(_Job(cid, params, client.train, config.lr, batches))
            else:
                evaluations.append(_Job(cid, params, client.test))
        done: dict[str, tuple[Message, float]] = {}
        done.update(self._run("fit", fits, self._fit_chunk))
        done.update(self._run("evaluate", evaluations, self._evaluate_chunk))
        replies = {
            cid: Reply(done[cid][0], done[cid][1], encoded_size(message), encoded_size(done[cid][0]))
            for cid, message in messages.items()
            if cid in done
        }
        return Exchange(replies, tuple(dropped))

    # -- chunks ----------------------------------------------------------------------------------------------

    def _run(
        self, phase: str, jobs: list[_Job], run_chunk: Callable[[list[_Job]], list[Message]]
    ) -> dict[str, tuple[Message, float]]:
        """Run ``jobs`` chunk by chunk, most work first: each client's reply and its share of the chunk's time."""
        empty = [job for job in jobs if len(job.data) == 0]  # evaluation only: fits on no data were refused
        jobs = sorted((job for job in jobs if len(job.data)), key=lambda j: (-len(j.batches), -len(j.data)))
        done = {job.client_id: (EvalResult(0.0, 0, {}).to_message(), 0.0) for job in empty}
        if not jobs:
            return done
        budget = self._budget_bytes()
        chunks = self._chunks(phase, jobs, budget)
        log.debug(
            "vectorized %s: %d clients in %d chunk(s) of at most %d (memory budget %.0f MiB)",
            phase, len(jobs), len(chunks), max(map(len, chunks)), budget / 2**20,
        )  # fmt: skip
        for chunk in chunks:
            began = time.perf_counter()
            with user_code(f"clients {chunk[0].client_id}..{chunk[-1].client_id} in {phase} (vectorized)"):
                results = run_chunk(chunk)
            seconds = (time.perf_counter() - began) / len(chunk)
            done.update({job.client_id: (reply, seconds) for job, reply in zip(chunk, results, strict=True)})
        return done

    def _budget_bytes(self) -> float:
        """The memory budget in bytes: as given, else 80% of the GPU's free memory, else 1024 MiB."""
        if self._budget_mb is not None:
            return self._budget_mb * 2.0**20
        if self._device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self._device)
            return free * _GPU_FREE_SHARE
        return _CPU_BUDGET_MB * 2.0**20

    def _chunks(self, phase: str, jobs: list[_Job], budget: float) -> list[list[_Job]]:
        """``jobs`` cut into consecutive chunks whose estimated working set fits the memory budget.

        A client costs its share of the model's working set (its params, their gradients and the update's
        temporaries, and activations for the widest batch, with a safety factor), its data, and its row of
        the chunk's step indices, which is as long as the chunk's first (longest-running) client's. A chunk
        holds at least one client, whatever the budget.
        """
        model = self._model
        row = jobs[0].data.x[:1].size * 4 + 8  # one example as float32 and its label
        if phase == "fit":
            width = max(len(job.batches[0]) for job in jobs)  # a client's first batch is its widest
            state = 4 * model.state_bytes  # params, gradients, the update's temporaries, vmap's copies
        else:
            width = min(self._task.eval_batch_size, len(jobs[0].data))
            state = model.state_bytes
        working = _SAFETY * (state + 2 * (model.act_fixed + width * model.act_per_example))

        def lockstep(head: _Job) -> float:  # per client: step indices, masks and losses
            return len(head.batches) * (width * 12 + 8) if phase == "fit" else len(head.data) * 9

        chunks: list[list[_Job]] = []
        used = 0.0
        for job in jobs:
            cost = working + len(job.data) * row
            if chunks and used + cost + lockstep(chunks[-1][0]) <= budget:
                chunks[-1].append(job)
                used += cost + lockstep(chunks[-1][0])
            else:
                chunks.append([job])
                used = cost + lockstep(job)
        return chunks

    def _stack(self, jobs: Sequence[_Job]) -> tuple[Arrays, Tensor]:
        """Each distinct params object of ``jobs`` once, stacked (``[distinct, ...]`` per name, in the model's
        dtypes, on the device), and which of them each client starts from."""
        position: dict[int, int] = {}
        distinct: list[Params] = []
        for job in jobs:
            if id(job.params) not in position:
                position[id(job.params)] = len(distinct)
                distinct.append(job.params)
                self._check(job.params)
        stacked = {}
        for name in self._model.names:
            # Cast as NumPy does, like TorchTask loading params into its model.
            arrays = np.stack([params[name] for params in distinct]).astype(self._model.dtypes[name], copy=False)
            stacked[name] = torch.from_numpy(arrays).to(self._device)
        which = torch.tensor([position[id(job.params)] for job in jobs], device=self._device)
        return stacked, which

    def _check(self, params: Params) -> None:
        """Refuse params that do not fit the model, as TorchTask does."""
        missing = [name for name in self._model.names if name not in params]
        unexpected = [name for name in params if name not in self._model.shapes]
        if missing or unexpected:
            raise ConfigError(f"params do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, shape in self._model.shapes.items():
            if tuple(params[name].shape) != shape:
                raise ConfigError(f"param {name!r} has shape {tuple(params[name].shape)}, the model expects {shape}")

    # -- fit -------------------------------------------------------------------------------------------------

    def _fit_chunk(self, jobs: list[_Job]) -> list[Message]:
        """Train ``jobs`` (sorted by step count, most first) in lockstep; their ``fit.result`` messages."""
        model, device = self._model, self._device
        steps = np.array([len(job.batches) for job in jobs])
        count, total_steps = len(jobs), int(steps[0])
        width = max(len(job.batches[0]) for job in jobs)
        sizes = np.array([len(job.data) for job in jobs])
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        # index[t, k, j]: the j-th example of client k's batch at step t in the flat data; mask says which are
        # real. Padding points at the client's first example, so that it is a finite, harmless input.
        index = np.broadcast_to(offsets[None, :, None], (total_steps, count, width)).copy()
        mask = np.zeros((total_steps, count, width), np.float32)
        batches = [batch for job in jobs for batch in job.batches]
        lengths = np.fromiter(map(len, batches), np.int64, len(batches))
        client = np.repeat(np.arange(count), steps)  # of each batch
        step = np.arange(len(batches)) - np.repeat(np.cumsum(steps) - steps, steps)
        clients, rows = np.repeat(client, lengths), np.repeat(step, lengths)  # of each example of each batch
        cols = np.arange(len(clients)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        index[rows, clients, cols] = offsets[clients] + np.concatenate(batches)
        mask[rows, clients, cols] = 1.0
        active = (steps[None, :] > np.arange(total_steps)[:, None]).sum(axis=1)  # a prefix, as steps descend
        widths = mask.sum(axis=2).max(axis=1).astype(np.int64)

        x, y = _flat(self._loss, [job.data for job in jobs], device)
        index_t = torch.from_numpy(index).to(device)
        mask_t = torch.from_numpy(mask).to(device)
        base, which = self._stack(jobs)
        state = {name: tensor.index_select(0, which) for name, tensor in base.items()}  # each client's own copy
        trainable = {name: state[name] for name in model.trainable}
        frozen = {name: state[name] for name in model.frozen}
        lrs = torch.tensor([-job.lr for job in jobs], dtype=torch.float64)
        neg_lr = {
            name: lrs.to(device, t.dtype).reshape((count,) + (1,) * (t.ndim - 1)) for name, t in trainable.items()
        }
        losses = torch.zeros((total_steps, count), dtype=torch.float64, device=device)
        self._module.train()
        for t in range(total_steps):
            a, b = int(active[t]), int(widths[t])
            rows_t = index_t[t, :a, :b]
            grads, values = self._step(
                {n: p[:a] for n, p in trainable.items()},
                {n: f[:a] for n, f in frozen.items()},
                x[rows_t],
                y[rows_t],
                mask_t[t, :a, :b],
            )
            for name, grad in grads.items():
                trainable[name][:a].addcmul_(neg_lr[name][:a], grad)  # p - lr * g, TorchTask's SGD step
            losses[t, :a] = values

        mean_loss = losses.sum(dim=0).cpu().numpy() / steps
        arrays = {name: tensor.detach().cpu().numpy() for name, tensor in state.items()}
        return [
            FitResult(
                Params({name: arrays[name][k] for name in model.names}),
                len(job.data),
                {"loss": float(mean_loss[k]), "steps": float(steps[k])},
            ).to_message()
            for k, job in enumerate(jobs)
        ]

    # -- evaluate --------------------------------------------------------------------------------------------

    def _evaluate_chunk(self, jobs: list[_Job]) -> list[Message]:
        """Evaluate ``jobs`` (sorted by test-set size, largest first) in eval mode, ``eval_batch_size``
        examples of every client at a time; their ``evaluate.result`` messages."""
        device = self._device
        sizes = np.array([len(job.data) for job in jobs])
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        largest = int(sizes[0])
        positions = np.arange(largest)[None, :]
        index = torch.from_numpy(offsets[:, None] + np.minimum(positions, sizes[:, None] - 1)).to(device)
        mask = torch.from_numpy(positions < sizes[:, None]).to(device)
        x, y = _flat(self._loss, [job.data for job in jobs], device)
        base, which = self._stack(jobs)
        shared = len(next(iter(base.values()))) == 1 if base else True
        state = {n: t[0] for n, t in base.items()} if shared else {n: t.index_select(0, which) for n, t in base.items()}
        per_example = _per_example_loss(self._loss)
        totals = torch.zeros(len(jobs), dtype=torch.float64, device=device)
        hits = torch.zeros(len(jobs), dtype=torch.int64, device=device)
        has_accuracy = True
        self._module.eval()
        with torch.no_grad():
            for start in range(0, largest, self._task.eval_batch_size):
                a = int((sizes > start).sum())  # a prefix, as sizes descend
                rows = index[:a, start : start + self._task.eval_batch_size]
                m = mask[:a, start : start + self._task.eval_batch_size]
                if shared:
                    logits = self._forward_shared(state, x[rows])
                else:
                    logits = self._forward({n: s[:a] for n, s in state.items()}, x[rows])
                targets = y[rows]
                losses = per_example(logits.flatten(0, 1), targets.flatten(0, 1))
                losses = losses.reshape(tuple(rows.shape) + tuple(losses.shape[1:]))
                weights = m.reshape(m.shape + (1,) * (losses.ndim - 2))
                totals[:a] += (losses.double() * weights).flatten(1).sum(dim=1)
                predictions = _predictions(logits, targets)
                has_accuracy = has_accuracy and predictions is not None
                if predictions is not None:
                    hits[:a] += ((predictions == targets.long()) & m).sum(dim=1)
        totals_np, hits_np = totals.cpu().numpy(), hits.cpu().numpy()
        return [
            EvalResult(
                float(totals_np[k] / n), int(n), {"accuracy": float(hits_np[k] / n)} if has_accuracy else {}
            ).to_message()
            for k, n in enumerate(sizes)
        ]


def _predictions(logits: Tensor, targets: Tensor) -> Tensor | None:
    """Each example's predicted class as TorchTask counts hits (argmax, or ``logit > 0`` for one logit), or
    None where the labels are not one class id per example. ``logits``: ``[clients, batch, ...]``."""
    if targets.ndim != 2:
        return None
    if logits.ndim == 3 and logits.shape[2] >= 2:
        return logits.argmax(dim=2)
    if logits[0, 0].numel() == 1:
        return (logits > 0).reshape(targets.shape)
    return None
