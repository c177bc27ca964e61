"""fedloom.data: datasets, partitioners and federated data containers."""

from fedloom.data.base import ArrayData, ClientData, Dataset, FederatedData
from fedloom.data.datasets import load_digits, load_heart_disease, load_mnist, load_synthetic
from fedloom.data.federate import federate
from fedloom.data.partition import dirichlet, iid, label_histogram, natural, partition, quantity_skew, shards

__all__ = [
    "ArrayData",
    "ClientData",
    "Dataset",
    "FederatedData",
    "dirichlet",
    "federate",
    "iid",
    "label_histogram",
    "load_digits",
    "load_heart_disease",
    "load_mnist",
    "load_synthetic",
    "natural",
    "partition",
    "quantity_skew",
    "shards",
]
