"""fedloom.privacy: differential privacy with a maintained accountant (and, to come, secure aggregation,
homomorphic encryption and a privacy ledger)."""

from fedloom.privacy.accounting import ACCOUNTANTS, Accountant, RoundAccountant, epsilon, noise_multiplier

__all__ = ["ACCOUNTANTS", "Accountant", "RoundAccountant", "epsilon", "noise_multiplier"]
