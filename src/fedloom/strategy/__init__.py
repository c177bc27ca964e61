"""fedloom.strategy: federated algorithms as explicit state in, state out, and their aggregation maths."""

from fedloom.strategy.aggregate import RunningMean, weighted_mean, weighted_mean_scalar
from fedloom.strategy.base import FitFold, FoldingStrategy, Strategy
from fedloom.strategy.fedavg import FedAvg, FedAvgState, sample_clients

__all__ = [
    "FedAvg",
    "FedAvgState",
    "FitFold",
    "FoldingStrategy",
    "RunningMean",
    "Strategy",
    "sample_clients",
    "weighted_mean",
    "weighted_mean_scalar",
]
