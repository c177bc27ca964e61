"""MNIST with the CNN of McMahan et al. 2017 (FedAvg paper, section 3), 100 clients, pathological non-IID.

    fedloom simulate mnist --data path/to/mnist          # a folder with the four IDX .gz files
    fedloom simulate mnist                               # downloads them (checksummed) into the cache

The CNN: two 5x5 convolutions (32 and 64 channels), each followed by 2x2 max pooling, a fully connected layer
of 512 ReLU units and a 10-way output (1,663,370 parameters). As in the paper's non-IID setting the training
set is sorted by label into 200 shards of 300 images and each client gets 2 shards; C = 0.1, E = 5, B = 10.
Unlike the paper, each client keeps 10% of its 600 images aside (holdout) for federated evaluation.
Needs the 60,000 training images.
"""

from torch import nn

import fedloom as fl
from fedloom.data import load_mnist


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


job = fl.Job(
    name="mnist_cnn",
    task=fl.TorchTask(model=cnn),
    data=load_mnist,
    strategy=fl.FedAvg(fraction=0.1, fit=fl.FitConfig(local_epochs=5, batch_size=10, lr=0.05)),
    simulation=fl.SimulationConfig(
        num_clients=100, rounds=50, holdout=0.1, partition=fl.PartitionConfig(scheme="shards", shards_per_client=2)
    ),
)
