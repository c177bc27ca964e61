"""fedloom.privacy: differential privacy with a maintained accountant (and, to come, secure aggregation,
homomorphic encryption and a privacy ledger)."""

from fedloom.privacy.accounting import ACCOUNTANTS, Accountant, epsilon, noise_multiplier
from fedloom.privacy.dp import DPFedAvg, DPState

__all__ = ["ACCOUNTANTS", "Accountant", "DPFedAvg", "DPState", "epsilon", "noise_multiplier"]
