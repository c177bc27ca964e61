"""Personalization (the families of Kulkarni et al. 2020, "Survey of Personalization Techniques for Federated
Learning"): a model per client that does better on that client's own data than one global model.

- Personal layers: :class:`FedPer` (Arivazhagan et al. 2019) keeps named layers on each client and averages
  only the others; :func:`FedRep` (Collins et al. 2021) trains the two parts in turn; :func:`FedBN` (Li et al.
  2021) keeps the batch-norm layers local.
- Regularized personal models: :class:`Ditto` (Li et al. 2021) trains a personal model pulled toward the
  global one, beside the global training.
- Local fine-tuning: ``finetune=`` on any :class:`~fedloom.strategy.sampling.ClientSampling` strategy.

Each evaluates every client's personalized model on that client's own test split: per client in the round's
client records, and on average as ``federated_accuracy`` (weighted by test examples) and
``client_mean_accuracy`` (each client once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedloom.core.config import FitConfig
from fedloom.core.errors import ConfigError, DecodeError
from fedloom.core.message import Message
from fedloom.core.params import Params
from fedloom.core.results import EvalResult, FitResult
from fedloom.strategy.fedavg import FedAvg, FedAvgState, _FedAvgFold
from fedloom.strategy.local import Client, load_matching, with_local

__all__ = ["Ditto", "DittoClient", "FedBN", "FedPer", "FedRep", "PersonalLayersClient", "personal_names"]

PERSONAL = "personal"
DITTO = "ditto"
_LAYERS_KEY = "personal.layers"
_DITTO_KEY = "ditto.model"


def personal_names(names: Sequence[str], layers: Sequence[str] = (), batch_norm: bool = False) -> list[str]:
    """The names among ``names`` that are personal: those equal to one of ``layers`` or inside it (``"head"``
    covers ``head.weight`` and ``head.bias``) and, with ``batch_norm``, every parameter and buffer of a
    batch-norm layer (a module whose state has a ``running_mean``, as torch's ``BatchNorm*d`` do).

    >>> personal_names(["body.weight", "bn.weight", "bn.running_mean", "head.bias"], ["head"], batch_norm=True)
    ['bn.weight', 'bn.running_mean', 'head.bias']
    """
    norms = {n[: -len("running_mean")] for n in names if n.endswith("running_mean")} if batch_norm else set()
    prefixes = [f"{layer}." for layer in layers]
    return [
        n for n in names if n in layers or any(n.startswith(p) for p in prefixes) or any(n.startswith(p) for p in norms)
    ]


def _last_layer(names: Sequence[str]) -> str:
    """The module that owns the model's last parameter: ``"2"`` for ``["0.weight", ..., "2.bias"]``."""
    last = names[-1] if names else ""
    return last.rpartition(".")[0] or last


@dataclass(frozen=True)
class FedPer(FedAvg):
    """Base + personal layers (FedPer, Arivazhagan et al. 2019): the layers named in ``personal`` (a module,
    such as ``"head"``, or a parameter's full name; by default the model's last layer, the module that owns
    its last parameter, as in the paper's top layers) never leave the clients. Each client keeps its own copy on
    its disk, trains the whole model on its data, and sends back only the shared (base) layers, which the
    server averages as FedAvg does (with any of FedAvg's server-side pieces). ``batch_norm=True`` makes every
    batch-norm layer personal too (that alone is :func:`FedBN`).

    With ``head_epochs`` > 0 the client trains as FedRep does (Collins et al. 2021): first its personal layers
    for ``head_epochs`` epochs with the base frozen, then the base as ``fit`` says with the personal layers
    frozen. The task must support ``frozen=`` (:class:`~fedloom.task.TorchTask` and
    :class:`~fedloom.task.LogisticRegressionTask` do).

    Instructions carry the whole model: the personal layers in them are the initial ones (the server never
    sees a trained one), which a client uses until it has its own. They are usually a small share of the model
    (a head, batch-norm scales). Federated evaluation runs each client's own model, base from the server and
    personal layers from its disk. The global model this strategy holds (and checkpoints, and evaluates
    centrally) is the averaged base with the initial personal layers, which is not a model anyone uses; judge
    it by the federated (personalized) metrics.
    """

    personal: tuple[str, ...] = ()
    batch_norm: bool = False
    head_epochs: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.personal, str):
            object.__setattr__(self, "personal", (self.personal,))
        personal = tuple(self.personal)
        if not all(isinstance(p, str) and p for p in personal):
            raise ConfigError(f"personal must be a list of layer names, got {self.personal!r}")
        object.__setattr__(self, "personal", personal)
        if isinstance(self.head_epochs, bool) or not isinstance(self.head_epochs, int) or self.head_epochs < 0:
            raise ConfigError(f"head_epochs must be a whole number >= 0, got {self.head_epochs!r}")
        if self.finetune is not None:
            raise ConfigError("FedPer evaluates each client's own personal layers; finetune= does not apply")

    def summable(self) -> str | None:
        """Why a protected sum cannot stand in for FedPer's aggregation: its clients send only some layers."""
        return "FedPer's clients send back only the shared layers, not an update of the whole model"

    def personal_names(self, params: Params) -> list[str]:
        """The names of ``params`` that stay on the clients."""
        layers = self.personal
        if not layers and not self.batch_norm:
            layers = (_last_layer(list(params)),)
        return personal_names(list(params), layers, self.batch_norm)

    def init(self, params: Params) -> FedAvgState:
        names = self.personal_names(params)
        if not names:
            raise ConfigError(
                f"no parameter of the model is personal (personal={list(self.personal)}, batch_norm="
                f"{self.batch_norm}); the model has {', '.join(list(params)[:12])}"
            )
        if len(names) == len(params):
            raise ConfigError("every parameter of the model is personal: there is nothing to federate")
        # the server optimizer (if any) moves only the base layers, so its state covers only them
        return replace(super().init(self._base(params)), params=params)

    def _base(self, params: Params) -> Params:
        personal = set(self.personal_names(params))
        return Params({n: a for n, a in params.items() if n not in personal}, copy=False)

    def _local(self, plain: Mapping[str, Message], params: Params) -> dict[str, Message]:
        """Each of ``plain``'s instructions for the personal-layers client half."""
        layers = self.personal_names(params)
        return {cid: with_local(m, PERSONAL, layers=layers, head_epochs=self.head_epochs) for cid, m in plain.items()}

    def configure_fit(
        self, server_round: int, state: FedAvgState, clients: Sequence[str], rng: np.random.Generator
    ) -> dict[str, Message]:
        return self._local(self.fit_instructions(server_round, state.params, clients, rng), state.params)

    def fit_reply_layout(self, instruction: Message) -> Params:
        return self._base(instruction.params)

    def configure_evaluate(
        self, server_round: int, state: FedAvgState, clients: Sequence[str], rng: np.random.Generator
    ) -> dict[str, Message]:
        return self._local(super().configure_evaluate(server_round, state, clients, rng), state.params)

    def aggregate_fit(
        self, server_round: int, state: FedAvgState, results: Mapping[str, FitResult]
    ) -> tuple[FedAvgState, dict[str, float]]:
        new, metrics = super().aggregate_fit(server_round, self._shared(state), results)
        return self._whole(new, state), metrics

    def fold_fit(self, server_round: int, state: FedAvgState) -> _PersonalFold | None:  # type: ignore[override]
        if self.aggregator is not None:
            return None
        return _PersonalFold(self, _FedAvgFold(self, server_round, self._shared(state)), state)

    def _shared(self, state: FedAvgState) -> FedAvgState:
        """``state`` with only the base layers: what FedAvg's aggregation works on."""
        return replace(state, params=self._base(state.params))

    def _whole(self, new: FedAvgState, old: FedAvgState) -> FedAvgState:
        """The new base layers with the (initial) personal layers of ``old``, in the model's order."""
        merged = {n: new.params.get(n, a) for n, a in old.params.items()}
        return replace(new, params=Params(merged, copy=False))


class _PersonalFold:
    """FedAvg's fold over the base layers, then the personal layers put back."""

    def __init__(self, strategy: FedPer, fold: _FedAvgFold, state: FedAvgState) -> None:
        self._strategy, self._fold, self._state = strategy, fold, state

    def add(self, client_id: str, result: FitResult) -> None:
        self._fold.add(client_id, result)

    def finish(self) -> tuple[FedAvgState, dict[str, float]]:
        new, metrics = self._fold.finish()
        return self._strategy._whole(new, self._state), metrics


def FedRep(personal: Sequence[str] = (), head_epochs: int = 10, **kwargs: Any) -> FedPer:  # noqa: N802
    """FedRep (Collins et al. 2021, "Exploiting Shared Representations for Personalized Federated Learning"):
    the shared representation (base) is federated, the head ``personal`` (by default the model's last layer)
    stays on each client; each round a
    client first fits its head for ``head_epochs`` epochs on the frozen representation, then the
    representation as ``fit`` says with the head frozen. Other arguments are :class:`FedPer`'s."""
    return FedPer(personal=tuple(personal), head_epochs=head_epochs, **kwargs)


def FedBN(**kwargs: Any) -> FedPer:  # noqa: N802
    """FedBN (Li et al. 2021, "FedBN: Federated Learning on Non-IID Features via Local Batch Normalization"):
    every batch-norm layer's scale, shift and running statistics stay on the client, the rest is FedAvg.
    Other arguments are :class:`FedPer`'s (``personal=`` adds more personal layers)."""
    return FedPer(batch_norm=True, **kwargs)


@dataclass(frozen=True)
class Ditto(FedAvg):
    """Ditto (Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through Personalization"): the global
    model is trained as FedAvg's, and beside it each sampled client trains a personal model ``v`` on
    ``f_k(v) + lam / 2 * ||v - w||^2``, ``w`` being the global model it was sent, with the same local budget
    (``fit``). ``v`` stays on the client's disk and is what federated evaluation measures; only the global
    update is sent. ``lam`` trades personalization (0: local training alone) for the global model (large).

    A client's personal model starts from the global model it gets at its first round (the paper starts it
    from the initial model; with partial participation a client may join late, and the current global model
    is the better start).
    """

    lam: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not self.lam >= 0:
            raise ConfigError(f"lam must be a number >= 0, got {self.lam!r}")
        if self.finetune is not None:
            raise ConfigError("Ditto evaluates each client's personal model; finetune= does not apply")

    def summable(self) -> str | None:
        """Why a protected sum cannot stand in for Ditto's aggregation: its clients run a local algorithm."""
        return "Ditto's clients run a local algorithm of their own, and a protected sum carries a plain fit"

    def configure_fit(
        self, server_round: int, state: FedAvgState, clients: Sequence[str], rng: np.random.Generator
    ) -> dict[str, Message]:
        plain = super().configure_fit(server_round, state, clients, rng)
        return {cid: with_local(message, DITTO, lam=float(self.lam)) for cid, message in plain.items()}

    def configure_evaluate(
        self, server_round: int, state: FedAvgState, clients: Sequence[str], rng: np.random.Generator
    ) -> dict[str, Message]:
        plain = super().configure_evaluate(server_round, state, clients, rng)
        return {cid: with_local(message, DITTO, lam=float(self.lam)) for cid, message in plain.items()}


# -- client halves ---------------------------------------------------------------------------------------------


class PersonalLayersClient:
    """FedPer's, FedRep's and FedBN's client half: the personal layers come from the client's disk (the
    instruction's initial ones the first time), the reply holds only the base layers."""

    def _model(self, client: Client, params: Params, args: Mapping[str, Any]) -> tuple[Params, list[str]]:
        layers = args.get("layers")
        if not isinstance(layers, list) or not all(isinstance(n, str) and n in params for n in layers):
            raise DecodeError(f"a personal-layers instruction must list names of the params it sends, got {layers!r}")
        mine = load_matching(client.state, _LAYERS_KEY, Params({n: params[n] for n in layers}, copy=False))
        if mine is None:
            return params, layers
        return Params({n: mine.get(n, a) for n, a in params.items()}, copy=False), layers

    def fit(self, client: Client, params: Params, config: FitConfig, args: Mapping[str, Any]) -> FitResult:
        model, layers = self._model(client, params, args)
        head_epochs = args.get("head_epochs", 0)
        if isinstance(head_epochs, bool) or not isinstance(head_epochs, int) or head_epochs < 0:
            raise DecodeError(f"head_epochs must be a whole number >= 0, got {head_epochs!r}")
        base = [n for n in model if n not in set(layers)]
        data = client.data.train
        steps = 0.0
        if head_epochs:
            head_config = replace(config, local_epochs=head_epochs, local_steps=None)
            head = _fit_frozen(client, model, head_config, base)
            model, steps = head.params, head.metrics.get("steps", 0.0)
            result = _fit_frozen(client, model, config, layers)
        else:
            result = client.task.fit(model, data, config)
        client.state.save(_LAYERS_KEY, Params({n: result.params[n] for n in layers}, copy=False))
        metrics = {**result.metrics, "steps": result.metrics.get("steps", 0.0) + steps}
        shared = Params({n: result.params[n] for n in base}, copy=False)
        return FitResult(shared, result.num_examples, metrics)

    def evaluate(self, client: Client, params: Params, args: Mapping[str, Any]) -> EvalResult:
        model, _layers = self._model(client, params, args)
        return client.task.evaluate(model, client.data.test)


def _fit_frozen(client: Client, params: Params, config: FitConfig, frozen: list[str]) -> FitResult:
    try:
        return client.task.fit(params, client.data.train, config, frozen=frozen)
    except TypeError as exc:
        if "frozen" not in str(exc):
            raise
        raise ConfigError(
            f"FedRep needs a task that can freeze parameters (fit(..., frozen=...)); {type(client.task).__name__} "
            "cannot"
        ) from None


class DittoClient:
    """Ditto's client half: FedAvg's local training of the global model, which is sent, and the personal
    model's, which is kept."""

    def fit(self, client: Client, params: Params, config: FitConfig, args: Mapping[str, Any]) -> FitResult:
        lam = _lam(args)
        global_update = client.task.fit(params, client.data.train, config)
        personal = load_matching(client.state, _DITTO_KEY, params) or params
        tuned = client.task.fit(personal, client.data.train, replace(config, proximal_mu=lam), anchor=params)
        client.state.save(_DITTO_KEY, tuned.params)
        metrics = dict(global_update.metrics)
        if "loss" in tuned.metrics:
            metrics["personal_loss"] = tuned.metrics["loss"]
        return FitResult(global_update.params, global_update.num_examples, metrics)

    def evaluate(self, client: Client, params: Params, args: Mapping[str, Any]) -> EvalResult:
        _lam(args)
        personal = load_matching(client.state, _DITTO_KEY, params)
        return client.task.evaluate(personal if personal is not None else params, client.data.test)


def _lam(args: Mapping[str, Any]) -> float:
    lam = args.get("lam")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
        raise DecodeError(f"a Ditto instruction's lam must be a number >= 0, got {lam!r}")
    return float(lam)
