"""fedloom.strategy: federated algorithms as explicit state in, state out, and their aggregation maths.

Every algorithm is a small frozen dataclass (or a named configuration of one) with explicit state; the client
half of an algorithm, where there is one, is a local algorithm (:mod:`fedloom.strategy.local`) that every
client runtime runs. ``STRATEGIES`` lists them by the names ``fedloom simulate --strategy`` takes.
"""

from fedloom.strategy.aggregate import RunningMean, weighted_mean, weighted_mean_scalar
from fedloom.strategy.base import AsyncStrategy, FitFold, FoldingStrategy, ReshapingStrategy, Strategy, UpdateBuffer
from fedloom.strategy.catalog import LOCAL_ALGORITHMS, STRATEGIES
from fedloom.strategy.fedavg import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedAvgState, FedProx, FedYogi
from fedloom.strategy.fedbuff import FedBuff
from fedloom.strategy.fednova import FedNova
from fedloom.strategy.ifca import IFCA
from fedloom.strategy.local import Client, ClientState, LocalAlgorithm
from fedloom.strategy.optimizers import Adagrad, Adam, ServerOptimizer, ServerSGD, Yogi
from fedloom.strategy.personal import Ditto, FedBN, FedPer, FedRep
from fedloom.strategy.qffl import QFedAvg
from fedloom.strategy.robust import (
    Bulyan,
    Krum,
    Mean,
    Median,
    TrimmedMean,
    bulyan,
    clip_to_norm,
    coordinate_median,
    krum,
    trimmed_mean,
)
from fedloom.strategy.sampling import ClientSampling, sample_clients
from fedloom.strategy.scaffold import Scaffold, ScaffoldState

__all__ = [
    "LOCAL_ALGORITHMS",
    "STRATEGIES",
    "Adagrad",
    "Adam",
    "AsyncStrategy",
    "Bulyan",
    "Client",
    "Ditto",
    "ClientSampling",
    "ClientState",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedAvgState",
    "FedBN",
    "FedBuff",
    "FedNova",
    "FedPer",
    "FedProx",
    "FedRep",
    "FedYogi",
    "FitFold",
    "FoldingStrategy",
    "IFCA",
    "Krum",
    "LocalAlgorithm",
    "Mean",
    "Median",
    "QFedAvg",
    "ReshapingStrategy",
    "RunningMean",
    "Scaffold",
    "ScaffoldState",
    "ServerOptimizer",
    "ServerSGD",
    "Strategy",
    "TrimmedMean",
    "UpdateBuffer",
    "Yogi",
    "bulyan",
    "clip_to_norm",
    "coordinate_median",
    "krum",
    "sample_clients",
    "trimmed_mean",
    "weighted_mean",
    "weighted_mean_scalar",
]
