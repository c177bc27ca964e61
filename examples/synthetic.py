"""FedProx's synthetic(1, 1) (Li et al. 2020): 30 devices with their own data distribution and labelling
model, multinomial logistic regression (NumPy), 10 devices per round, E = 20, B = 10, lr = 0.01.

    fedloom simulate synthetic
"""

from functools import partial

import fedloom as fl
from fedloom.data import load_synthetic

job = fl.Job(
    name="synthetic",
    task=fl.LogisticRegressionTask(num_features=60, num_classes=10),
    data=partial(load_synthetic, alpha=1.0, beta=1.0, num_clients=30, seed=0),
    strategy=fl.FedAvg(fraction=1 / 3, fit=fl.FitConfig(local_epochs=20, batch_size=10, lr=0.01)),
    simulation=fl.SimulationConfig(num_clients=30, rounds=50, partition=fl.PartitionConfig(scheme="natural")),
)
