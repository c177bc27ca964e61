"""Cross-device: a million phones with a few handwritten digits each, 1,000 of them trained per round.

    fedloom simulate cross_device
    fedloom simulate cross_device --clients 10000 --availability 0.5 --deadline 3
    python benchmarks/million_clients.py

Each of the 1,000,000 registered clients holds about 20 digits drawn with Dirichlet(0.5) label skew (see
``fedloom.data.lazy.digits_population``); a client's data is made only when it is sampled, so the whole
federation fits in well under 2 GiB. In a round 30% of the clients are online, 1,000 of those train one local
epoch (batch size 16, learning rate 0.05) of the 64-32-10 MLP, and the slowest ~10% miss the 1.5 s deadline:
client speeds are log-normal with sigma 0.5, and a step takes 0.5 simulated seconds at speed 1. The server
evaluates the global model on the digits test split.
"""

from torch import nn

import fedloom as fl
from fedloom.data.lazy import LazyFederation, digits_population

NUM_CLIENTS = 1_000_000


def mlp() -> nn.Module:
    """64 pixels -> 32 hidden units -> 10 digit logits."""
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def population(*, num_clients: int = NUM_CLIENTS, seed: int = 0) -> LazyFederation:
    """The digits population; nothing is materialized until a client is sampled. Keyword-only ``num_clients``
    and ``seed`` take the simulation's ``--clients`` and ``--seed``."""
    return digits_population(num_clients, seed=seed, alpha=0.5, mean_size=20)


job = fl.Job(
    name="cross_device",
    task=fl.TorchTask(model=mlp, loss="cross_entropy", optimizer="sgd"),
    data=population,
    strategy=fl.FedAvg(
        clients_per_round=1000,
        fraction_evaluate=0.0,
        fit=fl.FitConfig(local_epochs=1, batch_size=16, lr=0.05),
    ),
    simulation=fl.SimulationConfig(
        num_clients=NUM_CLIENTS,
        rounds=10,
        system=fl.SystemConfig(availability=0.3, speed_sigma=0.5, seconds_per_step=0.5, deadline=1.5),
    ),
)
