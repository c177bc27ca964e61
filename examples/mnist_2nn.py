"""MNIST with the "2NN" of McMahan et al. 2017: an MLP with two hidden layers of 200 ReLU units.

    fedloom simulate mnist_2nn --data path/to/mnist

199,210 parameters; 100 clients, pathological non-IID (2 shards of 300 images each), C = 0.1, E = 1, B = 10.
Unlike the paper, each client keeps 10% of its 600 images aside (holdout) for federated evaluation.
Needs the 60,000 training images.
"""

from torch import nn

import fedloom as fl
from fedloom.data import load_mnist


def mlp_2nn() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10)
    )


job = fl.Job(
    name="mnist_2nn",
    task=fl.TorchTask(model=mlp_2nn),
    data=load_mnist,
    strategy=fl.FedAvg(fraction=0.1, fit=fl.FitConfig(local_epochs=1, batch_size=10, lr=0.05)),
    simulation=fl.SimulationConfig(
        num_clients=100, rounds=50, holdout=0.1, partition=fl.PartitionConfig(scheme="shards", shards_per_client=2)
    ),
)
