"""A job's privacy protections as wrappers around its strategy (:mod:`fedloom.privacy`): differential privacy
(:class:`DPSettings`), then secure aggregation or Paillier aggregation (:class:`PrivacySettings`), applied by
:func:`with_protection`. :func:`fedloom.app.serve` applies them to a deployment; ``fedloom simulate`` to a
simulation. Errors name the command line's flags, which carry the same names as the fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fedloom.app.job import Job
from fedloom.core.errors import ConfigError
from fedloom.privacy.dp import DPFedAvg
from fedloom.privacy.he import PaillierAgg
from fedloom.privacy.paillier import PublicKey
from fedloom.privacy.secure import SecAgg

__all__ = ["DPSettings", "PrivacySettings", "with_protection"]


@dataclass(frozen=True)
class DPSettings:
    """User-level DP-FedAvg (``--dp-*``): on with a ``noise`` multiplier z; ``None`` leaves a setting at its
    default. ``clip`` is the clip norm C of each update (default 1.0), ``quantile`` turns on adaptive clipping
    towards that quantile of the update norms, ``delta`` is the delta of (epsilon, delta)-DP (default 1e-5, or
    0.1 / clients if that is smaller), and ``target_epsilon`` ends the run before a round would spend more."""

    noise: float | None = None
    clip: float | None = None
    quantile: float | None = None
    delta: float | None = None
    target_epsilon: float | None = None

    def wrap(self, job: Job, num_clients: int) -> Job:
        """``job`` with its strategy wrapped in :class:`~fedloom.privacy.DPFedAvg` over ``num_clients`` clients;
        ``job`` itself without ``noise``. Raises :class:`ConfigError` for settings given without ``noise`` and
        for a strategy whose aggregate is not a weighted sum (DPFedAvg says why)."""
        if self.noise is None:
            given = [name for name, value in dataclasses.asdict(self).items() if value is not None]
            if given:
                flags = ", ".join("--dp-" + name.replace("_", "-") for name in given)
                verb = "needs" if len(given) == 1 else "need"
                raise ConfigError(f"{flags} {verb} --dp-noise Z, the noise multiplier that turns DP-FedAvg on")
            return job
        strategy: Any = job.strategy  # DPFedAvg checks the capability itself, and says why not
        delta = self.delta if self.delta is not None else min(1e-5, 0.1 / num_clients)
        dp = DPFedAvg(
            strategy,
            num_clients=num_clients,
            clip_norm=self.clip if self.clip is not None else 1.0,
            noise_multiplier=self.noise,
            target_quantile=self.quantile,
            delta=delta,
            target_epsilon=self.target_epsilon,
        )
        return dataclasses.replace(job, strategy=dp)


@dataclass(frozen=True)
class PrivacySettings:
    """The protections of a run: ``dp`` (:class:`DPSettings`), then ``secagg`` (secure aggregation, SecAgg+
    with ``secagg_degree`` neighbours; with DP, distributed DP) or ``paillier`` (aggregation under Paillier
    encryption: the sites' :class:`~fedloom.privacy.PublicKey` in a deployment; ``True`` in a simulation, which
    makes a key pair of ``paillier_bits``). The default protects nothing."""

    dp: DPSettings = field(default_factory=DPSettings)
    secagg: bool = False
    secagg_degree: int | None = None
    paillier: PublicKey | bool | None = None
    paillier_bits: int = 2048


def with_protection(job: Job, privacy: PrivacySettings, *, num_clients: int) -> Job:
    """``job`` with its strategy wrapped for ``privacy``: DP-FedAvg over ``num_clients`` (see
    :meth:`DPSettings.wrap`), then :class:`~fedloom.privacy.SecAgg` or :class:`~fedloom.privacy.PaillierAgg`.
    Raises :class:`ConfigError` (one line) for settings that do not go together or a strategy they cannot wrap."""
    secagg, paillier = privacy.secagg, privacy.paillier
    if privacy.secagg_degree is not None and not secagg:
        raise ConfigError("--secagg-degree needs --secagg")
    if secagg and paillier:
        raise ConfigError("--secagg and --paillier are two ways to hide the updates; choose one")
    job = privacy.dp.wrap(job, num_clients)
    if not secagg and not paillier:
        return job
    strategy: Any = job.strategy  # the wrappers refuse, with the reason, what has no weighted sum to protect
    if secagg:
        return dataclasses.replace(job, strategy=SecAgg(strategy, degree=privacy.secagg_degree))
    key = paillier if isinstance(paillier, PublicKey) else None
    return dataclasses.replace(job, strategy=PaillierAgg(strategy, public_key=key, key_bits=privacy.paillier_bits))
