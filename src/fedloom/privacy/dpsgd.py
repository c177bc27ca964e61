"""Local DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy"): each client trains with
per-example gradient clipping and Gaussian noise, through Opacus, so that what it sends is differentially private
with respect to each single example of its data, whoever sees it (the server included).

The clipping, the noise and the Poisson sampling of each batch are Opacus's (``GradSampleModule``,
``DPOptimizer``, ``UniformWithReplacementSampler``); the accounting is dp-accounting's, through
:func:`fedloom.privacy.accounting.epsilon`. Nothing here clips or accounts by hand.
"""

from __future__ import annotations

import functools
import math
import secrets
import warnings
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator

from fedloom.core.config import FitConfig
from fedloom.core.errors import ConfigError, DataError
from fedloom.core.params import Params
from fedloom.core.results import EvalResult, FitResult
from fedloom.data.base import ArrayData
from fedloom.privacy.accounting import ACCOUNTANTS, Accountant, epsilon
from fedloom.task.torch_task import TorchTask, _frozen, _gradient_terms, _load, _to_params

__all__ = ["DPSGDTask"]

# The accountant is a pure function of (z, q, steps, delta), and clients of equal size ask the same question.
_epsilon = functools.lru_cache(maxsize=1024)(epsilon)


@dataclass(frozen=True)
class DPSGDTask:
    """A :class:`~fedloom.task.torch_task.TorchTask` whose ``fit`` is DP-SGD: sample-level differential privacy.

    Each local step of ``fit``:

    1. **Poisson sampling**: every one of the client's ``n`` examples joins the batch independently with
       probability ``q = min(1, B / n)`` (``B``: ``config.batch_size``), so batch sizes vary and may be 0;
    2. **clipping**: each example's gradient (over all trainable parameters) is scaled to L2 norm at most
       ``max_grad_norm`` (C);
    3. **noise**: the clipped gradients are summed, Gaussian noise of standard deviation ``noise_multiplier * C``
       (z C) is added, and the sum is divided by the *expected* batch size ``q n``;
    4. the task's optimizer (``"sgd"``, ``"adam"``, a callable) steps with that gradient.

    ``local_epochs=E`` takes ``E * ceil(n / B)`` steps (as many as the plain task), ``local_steps=S`` takes ``S``.
    FedProx's ``proximal_mu``, SCAFFOLD's ``correction`` and ``frozen`` parameters work as the
    :class:`~fedloom.task.base.Task` contract says: the proximal and correction terms are added after the noise
    (they depend on the models, not on the data, so they cost no privacy).

    Metrics (floats): ``steps``; ``dp_sgd_epsilon_round``, the epsilon at ``delta`` that this fit alone spends
    (``steps`` compositions of the sampled Gaussian mechanism with ``(z, q)``, by dp-accounting's ``accountant``,
    ``"rdp"`` or ``"pld"``); ``dp_sgd_sample_rate`` (q), ``dp_sgd_noise_multiplier``, ``dp_sgd_clip`` and
    ``dp_sgd_delta``. The task is shared by all the clients it runs and does not know the round, so it cannot add
    up a client's rounds: a client that trained ``T`` steps in all, at the same ``q``, spent
    ``epsilon(noise_multiplier=z, sample_rate=q, rounds=T, delta=delta)`` (``fedloom privacy epsilon``). The
    training loss is *not* reported: it is computed from the raw examples without noise, so sending it would
    leak what DP-SGD protects. ``evaluate`` and ``init_params`` are the wrapped task's.

    **Randomness.** By default the batches and the noise come from generators seeded by the operating system's
    entropy, so the server, which chooses ``config.seed``, can neither predict nor subtract them. With
    ``reproducible=True`` both are seeded from ``config.seed`` (the same seed gives bit-for-bit the same params on
    CPU): for experiments only, since whoever knows the seed can remove the noise. Dropout follows
    ``config.seed`` either way, as in the plain task.

    Raises :class:`ConfigError` at construction for values out of range and for a model that Opacus cannot
    train privately (BatchNorm and other layers that mix examples; Opacus's ``ModuleValidator`` says why), and
    at ``fit`` as the wrapped task does (params that do not fit the model); :class:`DataError` for empty data.

    >>> from torch import nn
    >>> task = DPSGDTask(TorchTask(lambda: nn.Linear(4, 3)), noise_multiplier=1.0, max_grad_norm=1.0)
    """

    task: TorchTask
    noise_multiplier: float
    max_grad_norm: float
    delta: float = 1e-5
    accountant: Accountant = "rdp"
    reproducible: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.task, TorchTask):
            raise ConfigError(f"DPSGDTask wraps a TorchTask, got {type(self.task).__name__}")
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"noise_multiplier must be > 0 (no noise is no privacy), got {self.noise_multiplier}")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ConfigError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}")
        errors = ModuleValidator.validate(self.task._build(0).train(), strict=False)
        if errors:
            # Opacus explains each problem at length; its first sentence names the layer and the reason.
            reasons = "; ".join(dict.fromkeys(str(e).split(". ")[0].rstrip(".") for e in errors))
            raise ConfigError(f"DP-SGD cannot train this model: {reasons} (opacus ModuleValidator)")

    def init_params(self, seed: int) -> Params:
        """The wrapped task's initial params."""
        return self.task.init_params(seed)

    def evaluate(self, params: Params, data: ArrayData) -> EvalResult:
        """The wrapped task's evaluation (not private: its loss and accuracy are computed on the raw data)."""
        return self.task.evaluate(params, data)

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
        """Train a copy of ``params`` on ``data`` with DP-SGD (see the class); never mutates ``params``.

        Returns the trained params (the same names), ``len(data)`` and the metrics the class lists. Raises
        :class:`DataError` for empty data and :class:`ConfigError` for params, an anchor, a correction or a frozen
        name that do not fit the model.
        """
        n = len(data)
        if n == 0:
            raise DataError("cannot fit on an empty dataset (0 examples)")
        q = min(1.0, config.batch_size / n)
        steps = _steps(n, config)
        # A fresh module for every fit: Opacus's hooks never touch the module the wrapped task evaluates with.
        module = self.task._build(0)
        _load(module, params)
        x = self.task._features(data.x)
        y = self.task._targets(data.y)
        loss_fn = self.task._loss_fn("mean")
        sampling, noise = self._generators(config.seed)
        with _frozen(module, frozen), self.task._seeded(config.seed), torch.enable_grad(), _hooks_quiet():
            terms = _gradient_terms(module, config.proximal_mu, params if anchor is None else anchor, correction)
            trainable = [p for p in module.parameters() if p.requires_grad]
            per_example = GradSampleModule(module, loss_reduction="mean")
            optimizer = DPOptimizer(
                self.task._optimizer(trainable, config.lr),
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                expected_batch_size=min(config.batch_size, n),
                loss_reduction="mean",
                generator=noise,
            )
            batches = UniformWithReplacementSampler(num_samples=n, sample_rate=q, generator=sampling, steps=steps)
            try:
                per_example.train()
                for batch in batches:
                    index = torch.tensor(batch, dtype=torch.long, device=x.device)
                    # An empty batch still takes its step: the noise must not reveal that nobody was sampled.
                    loss = loss_fn(per_example(x.index_select(0, index)), y.index_select(0, index))
                    torch.autograd.backward(loss)
                    if optimizer.pre_step():  # clip each example's gradient, add noise, divide by q n
                        if terms is not None:
                            terms()
                        optimizer.original_optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            finally:
                per_example._close()  # remove Opacus's hooks and per-example gradients from the module
        metrics = {
            "steps": float(steps),
            "dp_sgd_epsilon_round": self.spent(sample_rate=q, steps=steps),
            "dp_sgd_sample_rate": q,
            "dp_sgd_noise_multiplier": float(self.noise_multiplier),
            "dp_sgd_clip": float(self.max_grad_norm),
            "dp_sgd_delta": float(self.delta),
        }
        return FitResult(_to_params(module), n, metrics)

    def spent(self, *, sample_rate: float, steps: int) -> float:
        """Epsilon at ``delta`` of ``steps`` DP-SGD steps at sampling rate ``sample_rate`` (dp-accounting)."""
        return float(
            _epsilon(
                noise_multiplier=self.noise_multiplier,
                sample_rate=sample_rate,
                rounds=steps,
                delta=self.delta,
                accountant=self.accountant,
            )
        )

    def _generators(self, seed: int) -> tuple[torch.Generator, torch.Generator]:
        """The generators of the batches and of the noise: from ``seed`` when reproducible, else from the OS."""
        if self.reproducible:
            words = [int(w) for w in np.random.SeedSequence(seed).generate_state(2, np.uint64)]
        else:
            words = [secrets.randbits(64), secrets.randbits(64)]
        device = torch.device(self.task.device)
        return (
            torch.Generator().manual_seed(words[0]),  # Opacus's sampler draws on the CPU
            torch.Generator(device=device).manual_seed(words[1]),  # the noise is drawn where the params are
        )


def _steps(n: int, config: FitConfig) -> int:
    """``local_steps``, or as many steps as ``local_epochs`` passes of the plain task over ``n`` examples."""
    if config.local_steps is not None:
        return config.local_steps
    return (config.local_epochs or 1) * math.ceil(n / config.batch_size)


@contextmanager
def _hooks_quiet() -> Iterator[None]:
    """Opacus reads each layer's output gradient through a full backward hook; for the first layer, whose input
    needs no gradient, torch warns that such a hook sees only the output gradient, which is all Opacus needs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        yield
