"""fedloom.strategy: federated algorithms as explicit state in, state out, and their aggregation maths."""

from fedloom.strategy.aggregate import weighted_mean, weighted_mean_scalar
from fedloom.strategy.base import Strategy
from fedloom.strategy.fedavg import FedAvg, FedAvgState, sample_clients

__all__ = ["FedAvg", "FedAvgState", "Strategy", "sample_clients", "weighted_mean", "weighted_mean_scalar"]
