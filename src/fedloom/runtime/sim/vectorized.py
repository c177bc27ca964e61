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

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor
from torch.func import functional_call, vmap

from fedloom.core.codec import encoded_size
from fedloom.core.errors import ConfigError, DataError, user_code
from fedloom.core.message import Message, MessageKind
from fedloom.core.params import Params
from fedloom.core.results import EvalResult, FitResult, parse_instruction
from fedloom.data.base import ArrayData
from fedloom.privacy.mods import PROTOCOL_KINDS
from fedloom.runtime import telemetry
from fedloom.runtime.grid import Exchange, Reply, ReplyHandler, hand_over
from fedloom.runtime.sim.common import SimulatedClients
from fedloom.runtime.sim.vmap_model import (
    Arrays,
    ProbedModel,
    flat_data,
    inspect_model,
    per_example_loss,
    step_function,
    unsupported_reason,
)
from fedloom.strategy.local import local_args
from fedloom.task.batching import minibatches
from fedloom.task.torch_task import TorchTask

__all__ = ["VectorizedGrid", "unsupported_reason"]

log = logging.getLogger("fedloom.runtime.vectorized")

_CPU_BUDGET_MB = 1024
_GPU_FREE_SHARE = 0.8  # of the GPU's free memory, when no budget is given
_SAFETY = 2.0  # on top of the estimated working set: allocator slack, vmap's temporaries

# -- the grid ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """One client's instruction: its params and data, and for a fit its learning rate and minibatches."""

    client_id: str
    params: Params
    data: ArrayData
    lr: float = 0.0
    batches: tuple[npt.NDArray[np.intp], ...] = ()
    proximal_mu: float = 0.0


class VectorizedGrid:
    """Simulated clients of a :class:`TorchTask` run in this process, in lockstep on ``device``.

    Fit replies equal ``task.fit``'s (params to float tolerance, ``loss``, ``steps``, ``num_examples``) and
    evaluate replies ``task.evaluate``'s. Clients are trained in chunks whose estimated working set
    fits ``memory_budget_mb`` (default: 1024 MiB on CPU, 80% of the free memory on a GPU); clients with
    similar step counts share a chunk, and a client that has done its steps leaves the batch. FedProx's
    proximal term trains in lockstep too; an instruction that names an algorithm's own client half (SCAFFOLD,
    q-FFL...) or a protocol step (``secagg.*``) runs that client alone through its client app, as the inline
    backend would, with its state under ``clients.state_dir``. A plain fit or evaluate passes no mod, so an app
    with mods of the user's own (not :attr:`~fedloom.runtime.client.ClientApp.lockstep_safe`) is refused.

    Byte counts are exact wire sizes, computed without encoding every message: a message's encoded size is
    its params' part (which depends only on names, dtypes and shapes, so it is computed once per model) plus
    its metadata's part. Replies are handed to the loop as messages, not decoded from bytes; the loop
    validates every update anyway. ``seconds`` is a chunk's wall time shared equally among its clients.

    Raises :class:`ConfigError` for a task that is not a TorchTask or an app that is not lockstep-safe, when
    :func:`unsupported_reason` gives a reason, or when ``device`` is CUDA
    and torch sees no GPU; :class:`JobError` when the model raises. ``device=None`` means ``task.device``.
    ``probed`` is :func:`~fedloom.runtime.sim.vmap_model.inspect_model`'s model for this task and data, where the
    caller (the backend choice) has already probed it.
    """

    def __init__(
        self,
        clients: SimulatedClients,
        *,
        device: str | None = None,
        memory_budget_mb: int | None = None,
        probed: ProbedModel | None = None,
    ) -> None:
        task = clients.app.task
        if not isinstance(task, TorchTask):
            raise ConfigError(f"the vectorized backend needs a TorchTask, this is a {type(task).__name__}")
        if not clients.app.lockstep_safe:
            raise ConfigError(
                "the vectorized backend trains plain fits in lockstep, past the client mods; this job has mods of "
                "its own: run it on the inline, process or ray backend"
            )
        name = device if device is not None else getattr(task, "device", "cpu")
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("CUDA was asked for (--device cuda) but torch sees no GPU")
        model, reason = (probed, None) if probed is not None else inspect_model(task, clients.data)
        if model is None:
            raise ConfigError(f"the vectorized backend cannot run this task: {reason}")
        self._task = task
        self._clients = clients
        self._data = clients.data
        self._device = torch.device(name)
        self._budget_mb = memory_budget_mb
        self._loss = str(task.loss)
        self._model = model
        self._module = model.module.to(self._device)
        self._step = step_function(self._module, self._loss)

        def forward(state: Arrays, x: Tensor) -> Tensor:
            logits: Tensor = functional_call(self._module, state, (x,))
            return logits

        # Per-client params, or one params object shared by every client (FedAvg's evaluation).
        self._forward: Callable[[Arrays, Tensor], Tensor] = vmap(forward)
        self._forward_shared: Callable[[Arrays, Tensor], Tensor] = vmap(forward, in_dims=(None, 0))

    def client_ids(self) -> Sequence[str]:
        return self._data.client_ids

    def send_and_receive(
        self, messages: Mapping[str, Message], timeout: float | None = None, on_reply: ReplyHandler | None = None
    ) -> Exchange:
        server_round = 0
        fits: list[_Job] = []
        evaluations: list[_Job] = []
        done: dict[str, tuple[Message, float]] = {}
        for cid, message in messages.items():
            client = self._data.clients[cid]
            if message.kind in PROTOCOL_KINDS or local_args(message) is not None:  # run it as inline does
                began = time.perf_counter()
                with user_code(f"client {cid} in {message.kind}"):
                    reply = self._clients.app(message, self._clients.context(cid, client))
                done[cid] = (reply, time.perf_counter() - began)
                continue
            kind, server_round, params, config = parse_instruction(message)
            if kind == MessageKind.FIT:
                assert config is not None
                if len(client.train) == 0:
                    raise DataError("cannot fit on an empty dataset (0 examples)")
                batches = tuple(minibatches(len(client.train), config))
                fits.append(_Job(cid, params, client.train, config.lr, batches, config.proximal_mu))
            else:
                evaluations.append(_Job(cid, params, client.test))
        done.update(self._run("fit", fits, self._fit_chunk, server_round))
        done.update(self._run("evaluate", evaluations, self._evaluate_chunk, server_round))
        replies = {
            cid: Reply(done[cid][0], done[cid][1], encoded_size(message), encoded_size(done[cid][0]))
            for cid, message in messages.items()
            if cid in done
        }
        return hand_over(Exchange(replies), on_reply)

    # -- chunks ----------------------------------------------------------------------------------------------

    def _run(
        self, phase: str, jobs: list[_Job], run_chunk: Callable[[list[_Job]], list[Message]], server_round: int
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
            with (
                user_code(f"clients {chunk[0].client_id}..{chunk[-1].client_id} in {phase} (vectorized)"),
                telemetry.measure((phase, server_round), send_logs=False) as measured,
            ):
                results = run_chunk(chunk)
            seconds = (time.perf_counter() - began) / len(chunk)
            share = measured.share(len(chunk))  # the chunk's seconds split evenly, its peak memory as it was
            done.update(
                {job.client_id: (share.attach(reply), seconds) for job, reply in zip(chunk, results, strict=True)}
            )
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

        x, y = flat_data(self._loss, [job.data for job in jobs], device)
        index_t = torch.from_numpy(index).to(device)
        mask_t = torch.from_numpy(mask).to(device)
        base, which = self._stack(jobs)
        state = {name: tensor.index_select(0, which) for name, tensor in base.items()}  # each client's own copy
        trainable = {name: state[name] for name in model.trainable}
        frozen = {name: state[name] for name in model.frozen}
        neg_lr = _per_client([-job.lr for job in jobs], trainable)
        proximal = any(job.proximal_mu > 0 for job in jobs)
        if proximal:  # FedProx: each step's gradient gains mu * (w - w_start)
            mu = _per_client([job.proximal_mu for job in jobs], trainable)
            anchor = {name: t.clone() for name, t in trainable.items()}
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
                if proximal:
                    grad = grad + mu[name][:a] * (trainable[name][:a] - anchor[name][:a])
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
        x, y = flat_data(self._loss, [job.data for job in jobs], device)
        base, which = self._stack(jobs)
        shared = len(next(iter(base.values()))) == 1 if base else True
        state = {n: t[0] for n, t in base.items()} if shared else {n: t.index_select(0, which) for n, t in base.items()}
        per_example = per_example_loss(self._loss)
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


def _per_client(values: Sequence[float], like: Arrays) -> Arrays:
    """One value per client, shaped to broadcast over each stacked tensor of ``like`` (``[clients, ...]``), in its
    dtype and on its device."""
    column = torch.tensor(values, dtype=torch.float64)
    return {
        name: column.to(t.device, t.dtype).reshape((len(values),) + (1,) * (t.ndim - 1)) for name, t in like.items()
    }


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
