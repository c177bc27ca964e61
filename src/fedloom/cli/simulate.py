"""``fedloom simulate``: run a job file or a built-in example as a simulated federation."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from fedloom.cli.choices import STRATEGY_NAMES, TOPOLOGIES
from fedloom.cli.exporting import MlflowUri, TensorBoardDir, exporters
from fedloom.cli.gossip import check_gossip_flags, run_decentralized
from fedloom.cli.progress import ConsoleProgress, metric_text, print_announcements
from fedloom.cli.protection import (
    DPClipOption,
    DPDeltaOption,
    DPNoiseOption,
    DPQuantileOption,
    DPTargetOption,
    PaillierBitsOption,
    PaillierOption,
    SecAggDegreeOption,
    SecAggOption,
)
from fedloom.cli.runs import DbUrl
from fedloom.core.config import BACKENDS, PARTITION_SCHEMES, AttackConfig, PartitionConfig
from fedloom.core.errors import ConfigError

if TYPE_CHECKING:
    from fedloom.app.job import Job

_PANEL_SIM = "Federation"
_PANEL_FIT = "Strategy and local training"
_PANEL_BACKEND = "Backend"
_PANEL_SYSTEM = "Client systems (cross-device)"
_PANEL_ATTACK = "Attacks (robustness experiments)"
_PANEL_GOSSIP = "Decentralized (gossip, no server)"


StrategyOption = Annotated[
    str | None,
    typer.Option(
        help=f"The algorithm, instead of the job's: {', '.join(STRATEGY_NAMES)}. It keeps the job's sampling "
        "and local training settings.",
        rich_help_panel=_PANEL_FIT,
    ),
]
StrategyArgOption = Annotated[
    list[str] | None,
    typer.Option(
        help="An argument of --strategy as KEY=VALUE (repeat it), e.g. mu=0.01 or work_range=[1,20]; "
        "values are read as JSON where they parse, else as text.",
        rich_help_panel=_PANEL_FIT,
    ),
]


def simulate_command(
    job: Annotated[
        str,
        typer.Argument(
            help="A job file (path/to/job.py) or a built-in example: digits, "
            "heart_disease, mnist, mnist_2nn, synthetic, cross_device."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Runs folder; the run goes to OUT/<run-id>/.")] = Path("runs"),
    clients: Annotated[
        int | None, typer.Option(help="Number of simulated clients.", rich_help_panel=_PANEL_SIM)
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Number of rounds.", rich_help_panel=_PANEL_SIM)] = None,
    partition: Annotated[
        str | None, typer.Option(help=f"Partition scheme: {', '.join(PARTITION_SCHEMES)}.", rich_help_panel=_PANEL_SIM)
    ] = None,
    alpha: Annotated[
        float | None, typer.Option(help="Dirichlet concentration (dirichlet, quantity).", rich_help_panel=_PANEL_SIM)
    ] = None,
    shards: Annotated[int | None, typer.Option(help="Shards per client (shards).", rich_help_panel=_PANEL_SIM)] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="Folder to read the dataset from.", rich_help_panel=_PANEL_SIM)
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of everything random.", rich_help_panel=_PANEL_SIM)] = None,
    dropout: Annotated[
        float | None,
        typer.Option(help="Probability that a selected client fails to reply.", rich_help_panel=_PANEL_SIM),
    ] = None,
    strategy: StrategyOption = None,
    strategy_arg: StrategyArgOption = None,
    secagg: SecAggOption = False,
    secagg_degree: SecAggDegreeOption = None,
    paillier: PaillierOption = False,
    paillier_bits: PaillierBitsOption = 2048,
    dp_noise: DPNoiseOption = None,
    dp_clip: DPClipOption = None,
    dp_quantile: DPQuantileOption = None,
    dp_delta: DPDeltaOption = None,
    dp_target_epsilon: DPTargetOption = None,
    fraction: Annotated[
        float | None, typer.Option(help="Fraction C of clients trained per round.", rich_help_panel=_PANEL_FIT)
    ] = None,
    min_clients: Annotated[
        int | None, typer.Option(help="Fewest replies a round accepts.", rich_help_panel=_PANEL_FIT)
    ] = None,
    local_epochs: Annotated[int | None, typer.Option(help="Local epochs E.", rich_help_panel=_PANEL_FIT)] = None,
    local_steps: Annotated[
        int | None, typer.Option(help="Local SGD steps S (instead of epochs).", rich_help_panel=_PANEL_FIT)
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Local batch size B.", rich_help_panel=_PANEL_FIT)] = None,
    lr: Annotated[float | None, typer.Option(help="Local learning rate.", rich_help_panel=_PANEL_FIT)] = None,
    clients_per_round: Annotated[
        int | None,
        typer.Option(help="Clients sampled per round (instead of --fraction).", rich_help_panel=_PANEL_FIT),
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            help=f"What runs the clients: {', '.join(BACKENDS)} (auto: the fastest that supports the task).",
            rich_help_panel=_PANEL_BACKEND,
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="Torch device for the clients (cpu, cuda).", rich_help_panel=_PANEL_BACKEND)
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Worker processes or Ray actors (default: one per core).", rich_help_panel=_PANEL_BACKEND),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Address of an existing Ray cluster (implies --backend ray).", rich_help_panel=_PANEL_BACKEND
        ),
    ] = None,
    memory_budget_mb: Annotated[
        int | None,
        typer.Option(help="Memory the vectorized backend may use for stacked clients.", rich_help_panel=_PANEL_BACKEND),
    ] = None,
    availability: Annotated[
        float | None,
        typer.Option(help="Probability that a client is online in a round.", rich_help_panel=_PANEL_SYSTEM),
    ] = None,
    availability_trace: Annotated[
        str | None,
        typer.Option(help="An .npz trace of online intervals (client, start, end).", rich_help_panel=_PANEL_SYSTEM),
    ] = None,
    speed_sigma: Annotated[
        float | None,
        typer.Option(help="Spread of the log-normal client speeds (0: all equal).", rich_help_panel=_PANEL_SYSTEM),
    ] = None,
    speed_spread: Annotated[
        float | None,
        typer.Option(
            help="Client speeds drawn log-uniformly over this range, fastest over slowest (e.g. 10).",
            rich_help_panel=_PANEL_SYSTEM,
        ),
    ] = None,
    seconds_per_step: Annotated[
        float | None,
        typer.Option(help="Simulated seconds of one local step at speed 1.", rich_help_panel=_PANEL_SYSTEM),
    ] = None,
    deadline: Annotated[
        float | None,
        typer.Option(
            help="Round deadline in simulated seconds; slower clients are late.", rich_help_panel=_PANEL_SYSTEM
        ),
    ] = None,
    attack: Annotated[
        list[str] | None,
        typer.Option(
            help="Some clients attack, as KIND:FRACTION[:KEY=VALUE,...] (repeat it): kinds label_flip, scale, "
            "noise, backdoor; keys scale, boost, sigma, target_label, poison_fraction, trigger_size, "
            "clients=ID+ID. E.g. scale:0.2:scale=-10 or noise:0.1:sigma=2.",
            rich_help_panel=_PANEL_ATTACK,
        ),
    ] = None,
    topology: Annotated[
        str | None,
        typer.Option(
            help=f"Run the job decentralized instead of with its strategy: no server, every client trains its own "
            f"model and averages it with its neighbours' on this graph each round: {', '.join(TOPOLOGIES)}. "
            "The run is recorded in the runs folder like any other.",
            rich_help_panel=_PANEL_GOSSIP,
        ),
    ] = None,
    degree: Annotated[
        int | None,
        typer.Option(help="Neighbours per client of --topology regular.", rich_help_panel=_PANEL_GOSSIP),
    ] = None,
    threads: Annotated[int, typer.Option(help="CPU threads torch may use.", min=1)] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the final summary.")] = False,
    mlflow_uri: MlflowUri = None,
    tensorboard: TensorBoardDir = None,
    db: DbUrl = None,
) -> None:
    """Run a simulated federation and record it in the runs folder (with --topology: decentralized, no server)."""
    from fedloom.app.job import load_job
    from fedloom.app.protection import DPSettings, PrivacySettings, with_protection
    from fedloom.app.simulation import simulate
    from fedloom.core.graphs import check_topology

    if topology is not None:
        check_gossip_flags(
            {
                "--strategy": strategy,
                "--strategy-arg": strategy_arg,
                "--secagg": secagg or None,
                "--paillier": paillier or None,
                "--dp-noise": dp_noise,
                "--attack": attack,
                "--fraction": fraction,
                "--min-clients": min_clients,
                "--clients-per-round": clients_per_round,
                "--backend": backend,
                "--device": device,
                "--workers": workers,
                "--ray-address": ray_address,
                "--memory-budget-mb": memory_budget_mb,
            }
        )
        check_topology(topology, degree)
    elif degree is not None:
        raise ConfigError("--degree needs --topology regular")
    loaded = load_job(job)
    limit_torch_threads(threads)
    loaded = with_strategy(loaded, strategy, strategy_arg)
    configured = _apply_flags(
        loaded,
        simulation={
            "num_clients": clients,
            "rounds": rounds,
            "seed": seed,
            "dropout": dropout,
            "data_dir": data,
            "attacks": None if attack is None else tuple(parse_attack(spec) for spec in attack),
        },
        partition={"scheme": partition, "alpha": alpha, "shards_per_client": shards},
        backend={
            "name": "ray" if ray_address is not None and backend is None else backend,
            "device": device,
            "workers": workers,
            "ray_address": ray_address,
            "memory_budget_mb": memory_budget_mb,
        },
        system={
            "availability": availability,
            "availability_trace": availability_trace,
            "speed_sigma": speed_sigma,
            "speed_spread": speed_spread,
            "seconds_per_step": seconds_per_step,
            "deadline": deadline,
        },
        strategy={"fraction": fraction, "min_clients": min_clients, "clients_per_round": clients_per_round},
        fit={"local_epochs": local_epochs, "local_steps": local_steps, "batch_size": batch_size, "lr": lr},
    )
    privacy = PrivacySettings(
        DPSettings(dp_noise, dp_clip, dp_quantile, dp_delta, dp_target_epsilon),
        secagg=secagg,
        secagg_degree=secagg_degree,
        paillier=paillier,
        paillier_bits=paillier_bits,
    )
    configured = with_protection(configured, privacy, num_clients=configured.simulation.num_clients)
    console = Console(soft_wrap=True)  # a round line stays one line, whatever the terminal's width
    sim = configured.simulation
    print_announcements(console)
    mirrors = exporters(mlflow_uri, tensorboard)
    if topology is not None:
        run_decentralized(console, configured, topology, degree, quiet=quiet, out=out, exporters=mirrors, db_url=db)
        return
    observers = [] if quiet else [ConsoleProgress(console, sim.rounds, configured.name)]
    if observers:
        with observers[0]:
            run = simulate(configured, runs_dir=out, observers=observers, exporters=mirrors, db_url=db)
    else:
        run = simulate(configured, runs_dir=out, exporters=mirrors, db_url=db)
    final = "  ".join(f"{k} {metric_text(v)}" for k, v in run.final_metrics.items())
    console.print(f"finished run [bold]{run.run_id}[/]: {final}", highlight=False)
    console.print(f"params_sha256 {run.params_sha256}\nrun directory {run.run_dir}", highlight=False)


def limit_torch_threads(threads: int) -> None:
    """Clients train one after another on small batches, where torch's thread pool costs more than it gives
    (measured: a 64-32-10 MLP runs the quickstart 20x slower with 2 threads on a busy 2-core machine). Only
    a job that already imported torch is affected; a NumPy-only job never loads it."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _apply_flags(
    job: Job,
    *,
    simulation: dict[str, Any],
    partition: dict[str, Any],
    backend: dict[str, Any],
    system: dict[str, Any],
    strategy: dict[str, Any],
    fit: dict[str, Any],
) -> Job:
    """The job with the given flags laid over its defaults (flags left out keep the job's values)."""
    from fedloom.strategy.sampling import ClientSampling

    sim = job.simulation
    if _given(partition):
        sim = dataclasses.replace(
            sim, partition=PartitionConfig(**{**dataclasses.asdict(sim.partition), **_given(partition)})
        )
    if _given(backend):
        sim = dataclasses.replace(sim, backend=dataclasses.replace(sim.backend, **_given(backend)))
    if _given(system):
        sim = dataclasses.replace(sim, system=dataclasses.replace(sim.system, **_given(system)))
    sim = dataclasses.replace(sim, **_given(simulation))
    chosen = job.strategy
    strategy_flags, fit_flags = _given(strategy), _given(fit)
    if strategy_flags or fit_flags:
        if not isinstance(chosen, ClientSampling):
            raise ConfigError(
                f"--fraction, --min-clients, --clients-per-round and the local training flags apply to the "
                f"built-in strategies; job {job.name!r} uses {type(chosen).__name__}"
            )
        if "local_steps" in fit_flags and "local_epochs" not in fit_flags:
            fit_flags["local_epochs"] = None
        if "local_epochs" in fit_flags and "local_steps" not in fit_flags:
            fit_flags["local_steps"] = None
        chosen = dataclasses.replace(chosen, fit=dataclasses.replace(chosen.fit, **fit_flags), **strategy_flags)
    return dataclasses.replace(job, simulation=sim, strategy=chosen)


def with_strategy(job: Job, name: str | None, arguments: list[str] | None) -> Job:
    """``job`` with ``--strategy NAME`` and its ``--strategy-arg`` values, where given."""
    if name is not None:
        return dataclasses.replace(job, strategy=replace_strategy(job.strategy, name, arguments or []))
    if arguments:
        raise ConfigError("--strategy-arg needs --strategy NAME: the algorithm the arguments are for")
    return job


def replace_strategy(current: Any, name: str, arguments: list[str]) -> Any:
    """Strategy ``name`` built from ``KEY=VALUE`` ``arguments``, keeping ``current``'s client sampling and
    local training settings (fraction, fit...) where it has them and the arguments do not set them."""
    from fedloom.strategy.catalog import STRATEGIES, build_strategy, strategy_arguments
    from fedloom.strategy.sampling import ClientSampling

    parsed: dict[str, Any] = {}
    for argument in arguments:
        key, sep, text = argument.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--strategy-arg takes KEY=VALUE, got {argument!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        parsed[key.strip()] = tuple(value) if isinstance(value, list) else value
    kept: dict[str, Any] = {}
    if isinstance(current, ClientSampling) and name in STRATEGIES:
        taken = strategy_arguments(name)  # FedBuff, say, has no use for the job's fraction
        kept = {f.name: getattr(current, f.name) for f in dataclasses.fields(ClientSampling) if f.name in taken}
    return build_strategy(name, **{**kept, **parsed})


# How each key of ``--attack``'s KEY=VALUE list is read, and what its value must be.
_ATTACK_KEYS: dict[str, tuple[Callable[[str], Any], str]] = {
    "scale": (float, "a number"),
    "boost": (float, "a number"),
    "sigma": (float, "a number"),
    "target_label": (int, "a whole number"),
    "poison_fraction": (float, "a number"),
    "trigger_size": (int, "a whole number"),
    "clients": (lambda text: tuple(text.split("+")), "client ids joined by +"),
}


def parse_attack(spec: str) -> AttackConfig:
    """``--attack KIND:FRACTION[:KEY=VALUE,...]`` as an :class:`AttackConfig`, e.g. ``scale:0.2:scale=-10``;
    ``clients=ID+ID`` names attackers. Raises :class:`ConfigError` with a one-line reason for bad text."""
    kind, sep, rest = spec.partition(":")
    fraction_text, _, options = rest.partition(":")
    if not sep or not kind.strip() or not fraction_text.strip():
        raise ConfigError(f"--attack takes KIND:FRACTION[:KEY=VALUE,...], got {spec!r}")
    values: dict[str, Any] = {}
    try:
        values["fraction"] = float(fraction_text)
    except ValueError:
        raise ConfigError(f"--attack {spec!r}: the fraction {fraction_text.strip()!r} is not a number") from None
    for item in filter(str.strip, options.split(",")):
        key, sep, text = (part.strip() for part in item.partition("="))
        if not sep or key not in _ATTACK_KEYS:
            raise ConfigError(
                f"--attack {spec!r}: {item.strip()!r} is not KEY=VALUE with KEY one of {', '.join(_ATTACK_KEYS)}"
            )
        read, what = _ATTACK_KEYS[key]
        try:
            values[key] = read(text)
        except ValueError:
            raise ConfigError(f"--attack {spec!r}: {key} must be {what}, got {text!r}") from None
    try:
        return AttackConfig(kind.strip(), **values)
    except ConfigError as exc:
        raise ConfigError(f"--attack {spec!r}: {exc}") from None
