"""The privacy flags that ``fedloom simulate`` and ``fedloom server`` share: differential privacy (``--dp-*``),
secure aggregation (``--secagg``) and Paillier aggregation (``--paillier``), each a wrapper around the job's
strategy (:mod:`fedloom.privacy`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated

import typer

from fedloom.app.job import Job
from fedloom.core.errors import ConfigError
from fedloom.privacy.dp import DPFedAvg
from fedloom.privacy.he import PaillierAgg
from fedloom.privacy.paillier import PublicKey
from fedloom.privacy.secure import SecAgg
from fedloom.strategy.fedavg import FedAvg

__all__ = ["DPFlags", "with_protection"]

PANEL = "Privacy"

SecAggOption = Annotated[
    bool,
    typer.Option(
        "--secagg",
        help="Secure aggregation: the server learns only the sum of each round's updates (Bonawitz et al.). "
        "FedAvg-based strategies; with --dp-noise, the clients add the noise (distributed DP).",
        rich_help_panel=PANEL,
    ),
]
SecAggDegreeOption = Annotated[
    int | None,
    typer.Option(
        help="With --secagg: SecAgg+, each client masks with this many random neighbours instead of every other "
        "client of the round (about 3 log2 of the cohort is enough).",
        min=2,
        rich_help_panel=PANEL,
    ),
]
PaillierOption = Annotated[
    bool,
    typer.Option(
        "--paillier",
        help="Aggregate under Paillier encryption: the server adds the clients' encrypted updates and one client "
        "decrypts only the sum. The run makes the simulated clients' key pair. FedAvg-based strategies only.",
        rich_help_panel=PANEL,
    ),
]
PaillierBitsOption = Annotated[
    int,
    typer.Option(
        help="With --paillier: bits of the key pair the simulation makes (a deployment's comes from its key file).",
        min=1024,
        rich_help_panel=PANEL,
    ),
]
DPNoiseOption = Annotated[
    float | None,
    typer.Option(
        help="User-level DP-FedAvg with this noise multiplier z: each round's clients are Poisson-sampled at the "
        "job's --fraction, their updates clipped to --dp-clip and the sum noised; epsilon is recorded each round.",
        rich_help_panel=PANEL,
    ),
]
DPClipOption = Annotated[
    float | None,
    typer.Option(help="With --dp-noise: the clip norm C of each update (default 1.0).", rich_help_panel=PANEL),
]
DPQuantileOption = Annotated[
    float | None,
    typer.Option(
        help="With --dp-noise: adaptive clipping towards this quantile of the update norms, from --dp-clip "
        "(Andrew et al.; e.g. 0.5).",
        rich_help_panel=PANEL,
    ),
]
DPDeltaOption = Annotated[
    float | None,
    typer.Option(
        help="With --dp-noise: delta of (epsilon, delta)-DP (default 1e-5, or 0.1 / clients if that is smaller).",
        rich_help_panel=PANEL,
    ),
]
DPTargetOption = Annotated[
    float | None,
    typer.Option(
        help="With --dp-noise: end the run, with a message, before a round would spend more than this epsilon.",
        rich_help_panel=PANEL,
    ),
]


@dataclass(frozen=True)
class DPFlags:
    """The ``--dp-*`` flags as given (``None``: not given)."""

    noise: float | None = None
    clip: float | None = None
    quantile: float | None = None
    delta: float | None = None
    target_epsilon: float | None = None

    def wrap(self, job: Job, num_clients: int) -> Job:
        """``job`` with its FedAvg wrapped in :class:`~fedloom.privacy.DPFedAvg` over ``num_clients`` clients;
        ``job`` itself without ``--dp-noise``."""
        if self.noise is None:
            given = [name for name, value in dataclasses.asdict(self).items() if value is not None]
            if given:
                flags = ", ".join("--dp-" + name.replace("_", "-") for name in given)
                verb = "needs" if len(given) == 1 else "need"
                raise ConfigError(f"{flags} {verb} --dp-noise Z, the noise multiplier that turns DP-FedAvg on")
            return job
        strategy = job.strategy
        if not isinstance(strategy, FedAvg):
            raise ConfigError(
                f"--dp-noise runs DP-FedAvg around FedAvg; job {job.name!r} uses {type(strategy).__name__}"
            )
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


def with_protection(
    job: Job,
    *,
    num_clients: int,
    dp: DPFlags | None = None,
    secagg: bool = False,
    degree: int | None = None,
    paillier: PublicKey | bool | None = None,
    paillier_bits: int = 2048,
) -> Job:
    """``job`` with its strategy wrapped for the privacy flags: ``--dp-*`` (DP-FedAvg over ``num_clients``), then
    ``--secagg`` (:class:`~fedloom.privacy.SecAgg`; with DP, distributed DP) or ``--paillier``
    (:class:`~fedloom.privacy.PaillierAgg`: a public key in a deployment; ``True`` in a simulation, which makes a
    key pair of ``paillier_bits``)."""
    if degree is not None and not secagg:
        raise ConfigError("--secagg-degree needs --secagg")
    if secagg and paillier:
        raise ConfigError("--secagg and --paillier are two ways to hide the updates; choose one")
    job = (dp or DPFlags()).wrap(job, num_clients)
    if not secagg and not paillier:
        return job
    strategy = job.strategy
    flag = "--secagg" if secagg else "--paillier"
    if not isinstance(strategy, (FedAvg, DPFedAvg)) or (paillier and not isinstance(strategy, FedAvg)):
        what = "FedAvg's (or DP-FedAvg's)" if secagg else "FedAvg's (not DP-FedAvg's)"
        raise ConfigError(f"{flag} sums {what} updates; job {job.name!r} uses {type(strategy).__name__}")
    if secagg:
        return dataclasses.replace(job, strategy=SecAgg(strategy, degree=degree))
    assert isinstance(strategy, FedAvg)
    key = paillier if isinstance(paillier, PublicKey) else None
    return dataclasses.replace(job, strategy=PaillierAgg(strategy, public_key=key, key_bits=paillier_bits))
