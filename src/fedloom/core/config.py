"""Typed, frozen configuration objects. Files and command-line flags are parsed into these at the edges only."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from fedloom.core.errors import ConfigError

__all__ = [
    "ATTACK_KINDS",
    "BACKENDS",
    "PARTITION_SCHEMES",
    "AttackConfig",
    "BackendConfig",
    "FitConfig",
    "PartitionConfig",
    "SimulationConfig",
    "SystemConfig",
]

PARTITION_SCHEMES = ("iid", "dirichlet", "shards", "quantity", "natural")
BACKENDS = ("auto", "inline", "vectorized", "process", "ray")
ATTACK_KINDS = ("label_flip", "scale", "noise", "backdoor")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require_types(config: Any, ints: tuple[str, ...], numbers: tuple[str, ...] = ()) -> None:
    """Refuse wrong types up front, so that a float round count fails here and not inside ``range()``."""
    for name in ints:
        value = getattr(config, name)
        _require(value is None or _is_int(value), f"{name} must be a whole number, got {value!r}")
    for name in numbers:
        value = getattr(config, name)
        _require(_is_int(value) or isinstance(value, float), f"{name} must be a number, got {value!r}")


@dataclass(frozen=True)
class FitConfig:
    """How a client trains locally in one round (McMahan et al. 2017: E, B and the learning rate).

    Exactly one of ``local_epochs`` (E full passes over the client's data) and ``local_steps`` (S minibatch
    steps, cycling through reshuffled epochs as needed) is set. ``seed`` makes shuffling reproducible; the
    server derives a distinct one per client and round. ``proximal_mu`` (FedProx's mu, Li et al. 2020) adds
    ``mu / 2 * ||w - w_start||^2`` to the local loss, where ``w_start`` is the model training starts from (the
    global model), so that local models cannot drift far from it; 0 leaves the loss as it is.
    """

    local_epochs: int | None = 1
    local_steps: int | None = None
    batch_size: int = 32
    lr: float = 0.01
    seed: int = 0
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        _require_types(self, ("local_epochs", "local_steps", "batch_size", "seed"), ("lr", "proximal_mu"))
        _require(
            (self.local_epochs is None) != (self.local_steps is None),
            "set exactly one of local_epochs and local_steps",
        )
        _require(self.local_epochs is None or self.local_epochs >= 1, "local_epochs must be >= 1")
        _require(self.local_steps is None or self.local_steps >= 1, "local_steps must be >= 1")
        _require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _require(self.lr > 0, f"learning rate must be > 0, got {self.lr}")
        _require(self.proximal_mu >= 0, f"proximal_mu must be >= 0, got {self.proximal_mu}")

    def to_metadata(self) -> dict[str, Any]:
        return {
            "local_epochs": self.local_epochs,
            "local_steps": self.local_steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "seed": self.seed,
            "proximal_mu": self.proximal_mu,
        }

    @classmethod
    def from_metadata(cls, metadata: Any) -> FitConfig:
        if not isinstance(metadata, dict):
            raise ConfigError("fit config must be a JSON object")
        try:
            return cls(
                local_epochs=metadata.get("local_epochs"),
                local_steps=metadata.get("local_steps"),
                batch_size=metadata["batch_size"],
                lr=metadata["lr"],
                seed=metadata.get("seed", 0),
                proximal_mu=metadata.get("proximal_mu", 0.0),
            )
        except KeyError as exc:
            raise ConfigError(f"invalid fit config {metadata!r}: {exc}") from None


@dataclass(frozen=True)
class PartitionConfig:
    """How a centralized dataset is split over simulated clients.

    ``scheme`` is one of :data:`PARTITION_SCHEMES`: ``iid``; ``dirichlet`` label skew with concentration
    ``alpha``; ``shards`` (sort by label, ``shards_per_client`` shards each); ``quantity`` skew (client sizes
    from a Dirichlet(``alpha``), labels IID); ``natural`` (the dataset's own client ids, e.g. hospitals).
    """

    scheme: str = "iid"
    alpha: float = 0.5
    shards_per_client: int = 2

    def __post_init__(self) -> None:
        _require_types(self, ("shards_per_client",), ("alpha",))
        _require(
            self.scheme in PARTITION_SCHEMES,
            f"unknown partition scheme {self.scheme!r}; choose one of {', '.join(PARTITION_SCHEMES)}",
        )
        _require(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        _require(self.shards_per_client >= 1, f"shards_per_client must be >= 1, got {self.shards_per_client}")

    def label(self) -> str:
        """The scheme with the parameters it uses, as a run's headline shows it: ``dirichlet (alpha 0.5)``,
        ``quantity (alpha 0.5)``, ``shards (2 per client)``, ``iid``, ``natural``."""
        if self.scheme in ("dirichlet", "quantity"):
            return f"{self.scheme} (alpha {self.alpha:g})"
        if self.scheme == "shards":
            return f"shards ({self.shards_per_client} per client)"
        return self.scheme


@dataclass(frozen=True)
class BackendConfig:
    """Which simulation backend runs the clients, and its resources.

    ``name``: ``auto`` (the fastest backend that supports the task, announced in the log), ``inline`` (one
    after another in this process), ``vectorized`` (a round's clients train in lockstep with ``torch.vmap``),
    ``process`` (a pool of worker processes) or ``ray`` (Ray tasks, locally or on ``ray_address``).
    ``device`` overrides the task's torch device (``cuda`` runs the vectorized backend on the GPU).
    ``workers``: processes or Ray actors (``None``: one per CPU core). ``memory_budget_mb``: how much memory
    the vectorized backend's stacked clients may use (``None``: 1024 MiB on CPU, most of the free memory on a
    GPU); it trains the clients in chunks that fit.
    """

    name: str = "auto"
    device: str | None = None
    workers: int | None = None
    ray_address: str | None = None
    memory_budget_mb: int | None = None

    def __post_init__(self) -> None:
        _require_types(self, ("workers", "memory_budget_mb"))
        _require(self.name in BACKENDS, f"unknown backend {self.name!r}; choose one of {', '.join(BACKENDS)}")
        _require(self.workers is None or self.workers >= 1, f"workers must be >= 1, got {self.workers}")
        _require(
            self.memory_budget_mb is None or self.memory_budget_mb >= 1,
            f"memory_budget_mb must be >= 1, got {self.memory_budget_mb}",
        )
        _require(self.device is None or isinstance(self.device, str), f"device must be a string, got {self.device!r}")
        _require(self.ray_address is None or self.name in ("ray", "auto"), "ray_address needs the ray backend")


@dataclass(frozen=True)
class SystemConfig:
    """The clients' systems, as cross-device simulation models them: when they are online and how fast they are.

    - ``availability``: the probability that a client is online in a round (drawn per client and round); or
      ``availability_trace``, an ``.npz`` file of online intervals in simulated seconds (arrays ``client``,
      ``start``, ``end``; clients are numbered in registration order) that replaces it.
    - Stragglers: each client has a fixed speed drawn from a log-normal distribution with ``speed_sigma``
      (0: all equal), or, with ``speed_spread = r``, log-uniformly between ``1/r`` and 1 (the fastest client
      up to ``r`` times as fast as the slowest); a local step takes ``seconds_per_step / speed`` simulated
      seconds. A client whose training would end after ``deadline`` simulated seconds is late: it is left out
      of the round.

    Simulated time starts at 0 and advances by each round's duration (its deadline, or the slowest client's
    time when none is late). The defaults model none of this: every client online, equally fast, no deadline.
    """

    availability: float = 1.0
    availability_trace: str | None = None
    speed_sigma: float = 0.0
    seconds_per_step: float = 0.01
    deadline: float | None = None
    speed_spread: float | None = None

    def __post_init__(self) -> None:
        _require_types(self, (), ("availability", "speed_sigma", "seconds_per_step"))
        _require(0.0 < self.availability <= 1.0, f"availability must be in (0, 1], got {self.availability}")
        _require(self.speed_sigma >= 0.0, f"speed_sigma must be >= 0, got {self.speed_sigma}")
        _require(
            self.speed_spread is None or (isinstance(self.speed_spread, int | float) and self.speed_spread >= 1.0),
            f"speed_spread must be >= 1 (fastest over slowest), got {self.speed_spread!r}",
        )
        _require(
            self.speed_spread is None or self.speed_sigma == 0.0,
            "speed_sigma and speed_spread are two ways to draw client speeds; give one of them",
        )
        _require(self.seconds_per_step > 0.0, f"seconds_per_step must be > 0, got {self.seconds_per_step}")
        _require(
            self.deadline is None or (isinstance(self.deadline, int | float) and self.deadline > 0),
            f"deadline must be > 0 simulated seconds, got {self.deadline!r}",
        )

    @property
    def is_default(self) -> bool:
        return self == SystemConfig()


# Which options each attack kind reads; setting another kind's option is a mistake worth a ConfigError.
_ATTACK_OPTIONS = {
    "scale": ("scale",),
    "boost": ("backdoor",),
    "sigma": ("noise",),
    "target_label": ("backdoor",),
    "poison_fraction": ("backdoor",),
    "trigger_size": ("backdoor",),
}


@dataclass(frozen=True)
class AttackConfig:
    """Some simulated clients attack the federation, to exercise robust aggregation. Simulation only.

    Who attacks: ``clients`` (explicit client ids) and a ``fraction`` of all clients, drawn from the
    simulation seed among the clients that no attack names (the same seed chooses the same attackers). At
    least one of the two must choose somebody. How, by ``kind`` (one of :data:`ATTACK_KINDS`):

    - ``label_flip``: the attacker trains on labels ``y -> num_classes - 1 - y``.
    - ``scale``: its ``fit`` reply becomes ``global + scale * (local - global)``; the default ``-10`` sends
      the update scaled up and negated, ``0`` a free rider's unchanged global model.
    - ``noise``: Gaussian noise ``N(0, sigma^2)`` is added to every floating-point value of its ``fit`` reply
      (seeded per client and round).
    - ``backdoor``: a ``poison_fraction`` share of its training examples get a trigger (their last
      ``trigger_size`` features set to the largest feature value of its training data) and the label
      ``target_label``; ``boost`` scales its update as ``scale`` does (model replacement, Bagdasaryan et al.
      2020; 1 sends it as trained). The backdoor's success is the accuracy on triggered test examples of other
      labels, labelled ``target_label`` (build them with :func:`fedloom.runtime.sim.attacks.add_trigger`).

    Attackers answer evaluation honestly. Options of another kind than ``kind`` must keep their defaults.

        AttackConfig("scale", fraction=0.2)
        AttackConfig("backdoor", clients=("client-003",), target_label=7, boost=5.0)
    """

    kind: str
    fraction: float = 0.0
    clients: tuple[str, ...] = ()
    scale: float = -10.0
    boost: float = 1.0
    sigma: float = 1.0
    target_label: int = 0
    poison_fraction: float = 0.5
    trigger_size: int = 4

    def __post_init__(self) -> None:
        _require(
            self.kind in ATTACK_KINDS,
            f"unknown attack kind {self.kind!r}; choose one of {', '.join(ATTACK_KINDS)}",
        )
        _require_types(
            self, ("target_label", "trigger_size"), ("fraction", "scale", "boost", "sigma", "poison_fraction")
        )
        _require(
            isinstance(self.clients, (tuple, list)) and all(isinstance(c, str) and c for c in self.clients),
            f"attack clients must be a tuple of client ids, got {self.clients!r}",
        )
        object.__setattr__(self, "clients", tuple(self.clients))
        _require(len(set(self.clients)) == len(self.clients), f"attack clients name a client twice: {self.clients}")
        _require(0.0 <= self.fraction <= 1.0, f"attack fraction must be in [0, 1], got {self.fraction}")
        _require(
            self.fraction > 0.0 or bool(self.clients),
            f"attack {self.kind} chooses nobody: give a fraction > 0 or clients",
        )
        for name in ("scale", "boost", "sigma"):
            value = getattr(self, name)
            _require(math.isfinite(value), f"attack {name} must be a finite number, got {value}")
        _require(self.sigma >= 0.0, f"attack sigma must be >= 0, got {self.sigma}")
        _require(self.target_label >= 0, f"attack target_label must be >= 0, got {self.target_label}")
        _require(
            0.0 < self.poison_fraction <= 1.0, f"attack poison_fraction must be in (0, 1], got {self.poison_fraction}"
        )
        _require(self.trigger_size >= 1, f"attack trigger_size must be >= 1, got {self.trigger_size}")
        defaults = {f.name: f.default for f in fields(self)}
        for name, kinds in _ATTACK_OPTIONS.items():
            _require(
                self.kind in kinds or getattr(self, name) == defaults[name],
                f"attack option {name} applies to kind {' or '.join(kinds)}, not to {self.kind}",
            )


@dataclass(frozen=True)
class SimulationConfig:
    """A simulated federation: how many clients, how many rounds, how the data is split, how clients fail.

    ``backend`` chooses what runs the clients; ``system`` models availability and stragglers (cross-device).
    ``dropout`` is the probability that a selected client fails to reply in a round. ``holdout`` is the
    fraction of each client's own data kept aside for federated evaluation (ignored where the dataset has a
    natural per-client test split). ``data_dir`` is where datasets are read from (``None``: the loader's
    default, ``$FEDLOOM_DATA``, then its download cache). ``attacks`` make some clients attack (see
    :class:`AttackConfig`); a client is chosen by one attack at most.
    """

    num_clients: int = 10
    rounds: int = 5
    seed: int = 0
    dropout: float = 0.0
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    holdout: float = 0.2
    data_dir: str | None = None
    backend: BackendConfig = field(default_factory=BackendConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    attacks: tuple[AttackConfig, ...] = ()

    def __post_init__(self) -> None:
        _require_types(self, ("num_clients", "rounds", "seed"), ("dropout", "holdout"))
        _require(
            isinstance(self.attacks, (tuple, list)) and all(isinstance(a, AttackConfig) for a in self.attacks),
            f"attacks must be a tuple of AttackConfig, got {self.attacks!r}",
        )
        object.__setattr__(self, "attacks", tuple(self.attacks))
        _require(isinstance(self.partition, PartitionConfig), "partition must be a PartitionConfig")
        _require(isinstance(self.backend, BackendConfig), "backend must be a BackendConfig")
        _require(isinstance(self.system, SystemConfig), "system must be a SystemConfig")
        _require(self.num_clients >= 1, f"num_clients must be >= 1, got {self.num_clients}")
        _require(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}")
        _require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        _require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _require(0.0 <= self.holdout < 1.0, f"holdout must be in [0, 1), got {self.holdout}")
