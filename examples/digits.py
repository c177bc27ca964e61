"""Quickstart: scikit-learn's digits over 100 clients with Dirichlet(0.5) label skew, an MLP, FedAvg.

    fedloom simulate digits
    fedloom simulate examples/digits.py --clients 20 --rounds 10 --partition iid

Every client trains in every round (C = 1) for 5 local epochs with batch size 16 and learning rate 0.1.
"""

from torch import nn

import fedloom as fl
from fedloom.data import load_digits


def mlp() -> nn.Module:
    """64 pixels -> 32 hidden units -> 10 digit logits."""
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


job = fl.Job(
    name="digits",
    task=fl.TorchTask(model=mlp, loss="cross_entropy", optimizer="sgd"),
    data=load_digits,
    strategy=fl.FedAvg(fraction=1.0, fit=fl.FitConfig(local_epochs=5, batch_size=16, lr=0.1)),
    simulation=fl.SimulationConfig(
        num_clients=100,
        rounds=30,
        partition=fl.PartitionConfig(scheme="dirichlet", alpha=0.5),
    ),
)
