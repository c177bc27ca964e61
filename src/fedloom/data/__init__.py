"""fedloom.data: datasets, partitioners and federated data containers."""

from fedloom.data.base import ArrayData, ClientData, Dataset, FederatedData
from fedloom.data.datasets import load_digits, load_heart_disease, load_mnist, load_synthetic
from fedloom.data.federate import federate
from fedloom.data.lazy import ClientIds, LazyFederation, digits_population, partition_index
from fedloom.data.partition import dirichlet, iid, label_histogram, natural, partition, quantity_skew, shards

__all__ = [
    "ArrayData",
    "ClientData",
    "ClientIds",
    "Dataset",
    "FederatedData",
    "LazyFederation",
    "digits_population",
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
    "partition_index",
    "quantity_skew",
    "shards",
]
