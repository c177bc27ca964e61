"""Typed, frozen configuration objects. Files and command-line flags are parsed into these at the edges only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedloom.core.errors import ConfigError

__all__ = ["PARTITION_SCHEMES", "FitConfig", "PartitionConfig", "SimulationConfig"]

PARTITION_SCHEMES = ("iid", "dirichlet", "shards", "quantity", "natural")


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
    server derives a distinct one per client and round.
    """

    local_epochs: int | None = 1
    local_steps: int | None = None
    batch_size: int = 32
    lr: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        _require_types(self, ("local_epochs", "local_steps", "batch_size", "seed"), ("lr",))
        _require(
            (self.local_epochs is None) != (self.local_steps is None),
            "set exactly one of local_epochs and local_steps",
        )
        _require(self.local_epochs is None or self.local_epochs >= 1, "local_epochs must be >= 1")
        _require(self.local_steps is None or self.local_steps >= 1, "local_steps must be >= 1")
        _require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _require(self.lr > 0, f"learning rate must be > 0, got {self.lr}")

    def to_metadata(self) -> dict[str, Any]:
        return {
            "local_epochs": self.local_epochs,
            "local_steps": self.local_steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "seed": self.seed,
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


@dataclass(frozen=True)
class SimulationConfig:
    """A simulated federation: how many clients, how many rounds, how the data is split, how clients fail.

    ``dropout`` is the probability that a selected client fails to reply in a round. ``holdout`` is the
    fraction of each client's own data kept aside for federated evaluation (ignored where the dataset has a
    natural per-client test split). ``data_dir`` is where datasets are read from (``None``: the loader's
    default, ``$FEDLOOM_DATA``, then its download cache).
    """

    num_clients: int = 10
    rounds: int = 5
    seed: int = 0
    dropout: float = 0.0
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    holdout: float = 0.2
    data_dir: str | None = None

    def __post_init__(self) -> None:
        _require_types(self, ("num_clients", "rounds", "seed"), ("dropout", "holdout"))
        _require(isinstance(self.partition, PartitionConfig), "partition must be a PartitionConfig")
        _require(self.num_clients >= 1, f"num_clients must be >= 1, got {self.num_clients}")
        _require(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}")
        _require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        _require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _require(0.0 <= self.holdout < 1.0, f"holdout must be in [0, 1), got {self.holdout}")
