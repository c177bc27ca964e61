"""``fedloom privacy``: what a DP-FedAvg configuration spends, and the noise a privacy budget needs."""

from __future__ import annotations

from typing import Annotated

import typer

from fedloom.core.errors import ConfigError
from fedloom.privacy.accounting import ACCOUNTANTS, epsilon, noise_multiplier

app = typer.Typer(
    help="Differential privacy accounting (dp-accounting's RDP and PLD accountants).", no_args_is_help=True
)

SampleRate = Annotated[
    float, typer.Option(help="Probability q that a client takes part in a round (Poisson sampling).")
]
Rounds = Annotated[int, typer.Option(help="Number of rounds (each one sampled Gaussian mechanism).", min=0)]
Delta = Annotated[float, typer.Option(help="delta of (epsilon, delta)-DP; below 1/number of clients.")]
AccountantOption = Annotated[
    str, typer.Option(help=f"Accountant: {' or '.join(ACCOUNTANTS)} (tighter, slower).", case_sensitive=False)
]


def _accountant(name: str) -> str:
    if name.lower() not in ACCOUNTANTS:
        raise ConfigError(f"--accountant must be one of {', '.join(ACCOUNTANTS)}, got {name!r}")
    return name.lower()


@app.command("epsilon")
def epsilon_command(
    noise_multiplier_: Annotated[
        float, typer.Option("--noise-multiplier", help="Noise standard deviation over the clip norm, z.")
    ],
    sample_rate: SampleRate,
    rounds: Rounds,
    delta: Delta,
    accountant: AccountantOption = "rdp",
) -> None:
    """Print the epsilon that ROUNDS rounds of DP-FedAvg spend at DELTA."""
    spent = epsilon(
        noise_multiplier=noise_multiplier_,
        sample_rate=sample_rate,
        rounds=rounds,
        delta=delta,
        accountant=_accountant(accountant),  # type: ignore[arg-type]
    )
    typer.echo(
        f"epsilon {spent:.4f} at delta {delta:g} ({accountant.lower()}; z={noise_multiplier_:g}, "
        f"q={sample_rate:g}, {rounds} rounds)"
    )


@app.command("noise")
def noise_command(
    target_epsilon: Annotated[float, typer.Option(help="The privacy budget: epsilon at --delta.")],
    sample_rate: SampleRate,
    rounds: Rounds,
    delta: Delta,
    accountant: AccountantOption = "rdp",
) -> None:
    """Print the smallest noise multiplier that keeps ROUNDS rounds within TARGET_EPSILON at DELTA."""
    chosen = _accountant(accountant)
    z = noise_multiplier(
        target_epsilon=target_epsilon,
        sample_rate=sample_rate,
        rounds=rounds,
        delta=delta,
        accountant=chosen,  # type: ignore[arg-type]
    )
    check = epsilon(noise_multiplier=z, sample_rate=sample_rate, rounds=rounds, delta=delta, accountant=chosen)  # type: ignore[arg-type]
    typer.echo(
        f"noise multiplier {z:.4f} (epsilon {check:.4f} at delta {delta:g}; {chosen}, q={sample_rate:g}, "
        f"{rounds} rounds)"
    )
