"""The built-in algorithms by name: the strategies ``fedloom simulate --strategy NAME`` can build, and the
client halves (local algorithms) every client runtime knows."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from fedloom.core.errors import ConfigError
from fedloom.strategy.fedavg import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi
from fedloom.strategy.fedbuff import FedBuff
from fedloom.strategy.fednova import FedNova
from fedloom.strategy.ifca import IFCA, IFCAClient
from fedloom.strategy.local import FINETUNE, FineTune, LocalAlgorithm
from fedloom.strategy.personal import DITTO, PERSONAL, Ditto, DittoClient, FedBN, FedPer, FedRep, PersonalLayersClient
from fedloom.strategy.qffl import QFedAvg, QFedAvgClient
from fedloom.strategy.robust import Bulyan, Krum, Median, TrimmedMean
from fedloom.strategy.scaffold import Scaffold, ScaffoldClient

__all__ = ["LOCAL_ALGORITHMS", "STRATEGIES", "build_strategy", "strategy_arguments"]

#: Local algorithms by the name strategies put in their instructions.
LOCAL_ALGORITHMS: Mapping[str, LocalAlgorithm] = {
    "qffl": QFedAvgClient(),
    "scaffold": ScaffoldClient(),
    PERSONAL: PersonalLayersClient(),
    DITTO: DittoClient(),
    FINETUNE: FineTune(),
    "ifca": IFCAClient(),
}


def _robust(rule: Callable[..., Any], *names: str) -> Callable[..., FedAvg]:
    """A FedAvg whose aggregator is ``rule(**its arguments)``: the arguments ``names`` go to the rule, the
    others to FedAvg."""

    def build(**kwargs: Any) -> FedAvg:
        rule_args = {k: kwargs.pop(k) for k in names if k in kwargs}
        return FedAvg(aggregator=rule(**rule_args), **kwargs)

    build.__doc__ = f"FedAvg aggregating with {rule.__name__} ({', '.join(names) or 'no arguments'})."
    rule_parameters = inspect.signature(rule).parameters
    own = [rule_parameters[n].replace(kind=inspect.Parameter.KEYWORD_ONLY) for n in names]
    build.__signature__ = inspect.Signature(  # type: ignore[attr-defined]  # what strategy_arguments reads
        [*own, inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    )
    return build


#: Strategy builders by name. Each takes :class:`~fedloom.strategy.sampling.ClientSampling`'s arguments
#: (``fraction``, ``fit``, ...) and its own.
STRATEGIES: Mapping[str, Callable[..., Any]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadagrad": FedAdagrad,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "scaffold": Scaffold,
    "fednova": FedNova,
    "qffl": QFedAvg,
    "median": _robust(Median),
    "trimmed_mean": _robust(TrimmedMean, "beta"),
    "krum": _robust(Krum, "f", "m"),
    "bulyan": _robust(Bulyan, "f"),
    "fedper": FedPer,
    "fedrep": FedRep,
    "fedbn": FedBN,
    "ditto": Ditto,
    "ifca": IFCA,
    "fedbuff": FedBuff,
}


#: Arguments of FedAvg's round that a strategy does not take: FedBuff keeps ``concurrency`` clients training
#: instead of sampling a share of them each round.
NOT_TAKEN: Mapping[str, tuple[str, ...]] = {"fedbuff": ("fraction", "clients_per_round")}


def strategy_arguments(name: str) -> list[str]:
    """The arguments strategy ``name`` takes: its own, then those every FedAvg-like strategy takes."""
    builder = STRATEGIES[name]
    own = [
        p.name
        for p in inspect.signature(builder).parameters.values()
        if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    ]
    shared = [f.name for f in dataclasses.fields(FedAvg) if f.name not in ("aggregator", "server_optimizer")]
    return [n for n in (*own, *(n for n in shared if n not in own)) if n not in NOT_TAKEN.get(name, ())]


def build_strategy(name: str, **arguments: Any) -> Any:
    """Strategy ``name`` with ``arguments``; :class:`ConfigError` names an unknown strategy or argument."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    accepted = strategy_arguments(name)
    unknown = [k for k in arguments if k not in accepted]
    if unknown:
        raise ConfigError(f"strategy {name!r} has no argument {unknown[0]!r}; it takes {', '.join(accepted)}")
    try:
        return STRATEGIES[name](**arguments)
    except TypeError as exc:  # a value of the wrong type deep in a constructor
        raise ConfigError(f"strategy {name!r}: {exc}") from None
