"""fedloom.privacy: differential privacy with a maintained accountant (central DP-FedAvg, distributed DP, local
DP-SGD), secure aggregation, homomorphic encryption and a privacy ledger.

``DPSGDTask`` is imported lazily: it needs torch and Opacus, which ``import fedloom`` does not load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedloom.privacy.accounting import ACCOUNTANTS, Accountant, epsilon, noise_multiplier
from fedloom.privacy.dp import DPFedAvg, DPState
from fedloom.privacy.he import PaillierAgg
from fedloom.privacy.mods import ClientNoise, PaillierMod, SecAggMod, protocol_mods
from fedloom.privacy.paillier import EncryptedVector, KeyPair, PaillierError, PublicKey
from fedloom.privacy.secagg import SecAggError
from fedloom.privacy.secure import SecAgg, SecAggSessions

if TYPE_CHECKING:
    from fedloom.privacy.dpsgd import DPSGDTask

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "ClientNoise",
    "DPFedAvg",
    "DPSGDTask",
    "DPState",
    "EncryptedVector",
    "KeyPair",
    "PaillierAgg",
    "PaillierError",
    "PaillierMod",
    "PublicKey",
    "SecAgg",
    "SecAggError",
    "SecAggMod",
    "SecAggSessions",
    "epsilon",
    "noise_multiplier",
    "protocol_mods",
]


def __getattr__(name: str) -> Any:
    if name == "DPSGDTask":
        from fedloom.privacy.dpsgd import DPSGDTask

        return DPSGDTask
    raise AttributeError(f"module 'fedloom.privacy' has no attribute {name!r}")
