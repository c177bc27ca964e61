"""The privacy flags that ``fedloom simulate`` and ``fedloom server`` share: differential privacy (``--dp-*``),
secure aggregation (``--secagg``) and Paillier aggregation (``--paillier``). The commands pass them on as
:class:`~fedloom.app.protection.PrivacySettings`, which wrap the job's strategy (:mod:`fedloom.app.protection`)."""

from __future__ import annotations

from typing import Annotated

import typer

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
