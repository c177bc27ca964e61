"""``fedloom privacy``: what a DP-FedAvg configuration spends, the noise a privacy budget needs, and a
federation's Paillier keys."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedloom.cli.choices import ACCOUNTANTS
from fedloom.cli.runs import DbUrl, RunRef, RunsDir
from fedloom.core.errors import ConfigError

if TYPE_CHECKING:
    from fedloom.privacy.accounting import Accountant
    from fedloom.privacy.paillier import KeyPair, PublicKey

KEY_FILE, PUBLIC_FILE = "paillier.key", "paillier.pub"

app = typer.Typer(
    help="Differential privacy accounting (dp-accounting's RDP and PLD accountants); Paillier keys.",
    no_args_is_help=True,
)

SampleRate = Annotated[
    float, typer.Option(help="Probability q that a client takes part in a round (Poisson sampling).")
]
Rounds = Annotated[int, typer.Option(help="Number of rounds (each one sampled Gaussian mechanism).", min=0)]
Delta = Annotated[float, typer.Option(help="delta of (epsilon, delta)-DP; below 1/number of clients.")]
AccountantOption = Annotated[
    str, typer.Option(help=f"Accountant: {' or '.join(ACCOUNTANTS)} (tighter, slower).", case_sensitive=False)
]


def _accountant(name: str) -> Accountant:
    from fedloom.privacy.accounting import ACCOUNTANTS

    for known in ACCOUNTANTS:
        if name.lower() == known:
            return known
    raise ConfigError(f"--accountant must be one of {', '.join(ACCOUNTANTS)}, got {name!r}")


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
    from fedloom.privacy.accounting import epsilon

    spent = epsilon(
        noise_multiplier=noise_multiplier_,
        sample_rate=sample_rate,
        rounds=rounds,
        delta=delta,
        accountant=_accountant(accountant),
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
    from fedloom.privacy.accounting import epsilon, noise_multiplier

    chosen = _accountant(accountant)
    z = noise_multiplier(
        target_epsilon=target_epsilon,
        sample_rate=sample_rate,
        rounds=rounds,
        delta=delta,
        accountant=chosen,
    )
    check = epsilon(noise_multiplier=z, sample_rate=sample_rate, rounds=rounds, delta=delta, accountant=chosen)
    typer.echo(
        f"noise multiplier {z:.4f} (epsilon {check:.4f} at delta {delta:g}; {chosen}, q={sample_rate:g}, "
        f"{rounds} rounds)"
    )


@app.command("paillier-keys")
def paillier_keys_command(
    out: Annotated[
        Path, typer.Option(help="Folder to write paillier.key (the sites') and paillier.pub (the server's).")
    ],
    bits: Annotated[int, typer.Option(help="Bits of the modulus (2048 is the usual choice).", min=1024)] = 2048,
    force: Annotated[bool, typer.Option("--force", help="Overwrite keys already in --out.")] = False,
) -> None:
    """Make a federation's Paillier key pair for --paillier: paillier.key goes to every site (fedloom client
    --paillier-key), out of band, like its token; paillier.pub to the server (fedloom server --paillier). The
    server can add what the sites encrypt; only a holder of paillier.key can decrypt."""
    from fedloom.privacy.paillier import KeyPair

    key_file, public_file = out / KEY_FILE, out / PUBLIC_FILE
    if not force and (key_file.exists() or public_file.exists()):
        raise ConfigError(f"{out} already holds Paillier keys; pass --force to replace them")
    keys = KeyPair.generate(bits)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(keys.to_bytes())
    public_file.write_bytes(keys.public.to_bytes())
    typer.echo(f"wrote {key_file} (for the sites; keep it from the server) and {public_file} (for the server)")
    typer.echo(f"key {keys.public.fingerprint.hex()}, {keys.public.bits} bits")


def read_key_pair(path: Path) -> KeyPair:
    """The key pair in ``path`` (written by ``paillier-keys``), or one :class:`ConfigError` line."""
    from fedloom.privacy.paillier import KeyPair

    return KeyPair.from_bytes(_read(path, "Paillier key pair"))


def read_public_key(path: Path) -> PublicKey:
    """The public key in ``path`` (written by ``paillier-keys``), or one :class:`ConfigError` line."""
    from fedloom.privacy.paillier import PublicKey

    return PublicKey.from_bytes(_read(path, "Paillier public key"))


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None


@app.command("spent")
def spent_command(
    run: RunRef,
    runs: RunsDir = Path("runs"),
    db: DbUrl = None,
    accountant: AccountantOption = "rdp",
) -> None:
    """What RUN spent: the epsilon its DP-FedAvg recorded in the last round and, for local DP-SGD
    (DPSGDTask), each client's epsilon over all the rounds it trained in, composed by dp-accounting from the
    sampling rate, noise and steps each of its fits recorded."""
    from fedloom.privacy.accounting import composed_epsilon
    from fedloom.tracking import RunStore

    store = RunStore(runs, db)
    info = store.info(run)
    rows = store.rounds(run)
    last = rows[-1] if rows else {}
    if last.get("epsilon") is not None:
        central = f"epsilon {last['epsilon']:.4f} at delta {last['dp_delta']:g} after round {last['round']}"
        typer.echo(f"DP-FedAvg (user level): {central}")
    fits: dict[str, list[tuple[float, float, int]]] = {}
    deltas = set()
    for row in store.client_metrics(run):
        metrics = row.get("metrics") or {}
        if row["phase"] == "fit" and row["status"] == "ok" and "dp_sgd_noise_multiplier" in metrics:
            mechanism = (metrics["dp_sgd_noise_multiplier"], metrics["dp_sgd_sample_rate"], int(metrics["steps"]))
            fits.setdefault(row["client_id"], []).append(mechanism)
            deltas.add(metrics["dp_sgd_delta"])
    if not fits:
        if last.get("epsilon") is None:
            typer.echo(f"run {info.run_id} recorded no differential privacy")
        return
    if len(deltas) != 1:
        raise ConfigError(f"run {info.run_id}'s clients used different deltas ({sorted(deltas)}); cannot compare")
    delta = deltas.pop()
    name = _accountant(accountant)
    spent = {cid: composed_epsilon(m, delta=delta, accountant=name) for cid, m in sorted(fits.items())}
    typer.echo(f"local DP-SGD (sample level), epsilon at delta {delta:g} by {name}, per client over its fits:")
    for cid, value in spent.items():
        typer.echo(f"  {cid}  {len(fits[cid])} fits  {sum(m[2] for m in fits[cid])} steps  epsilon {value:.4f}")
    typer.echo(f"most spent: {max(spent.values()):.4f} ({max(spent, key=spent.__getitem__)})")
