"""Privacy accounting agrees with dp-accounting's published numbers and refuses nonsense."""

from __future__ import annotations

import math

import pytest

from fedloom.core import ConfigError
from fedloom.privacy import epsilon, noise_multiplier

# The reference point: q = 0.01, z = 1.0, 1000 steps, delta = 1e-5 is about 2.10 (RDP), 1.83 (PLD).
REFERENCE = {"noise_multiplier": 1.0, "sample_rate": 0.01, "rounds": 1000, "delta": 1e-5}


def test_epsilon_agrees_with_dp_accounting_at_the_reference_point():
    assert epsilon(**REFERENCE) == pytest.approx(2.10, abs=0.005)
    assert epsilon(**REFERENCE, accountant="pld") == pytest.approx(1.83, abs=0.005)


def test_more_noise_fewer_rounds_or_a_smaller_sample_spend_less():
    base = epsilon(**REFERENCE)
    assert epsilon(**{**REFERENCE, "noise_multiplier": 2.0}) < base
    assert epsilon(**{**REFERENCE, "rounds": 100}) < base
    assert epsilon(**{**REFERENCE, "sample_rate": 0.001}) < base
    assert epsilon(**{**REFERENCE, "rounds": 0}) == 0.0
    assert epsilon(**{**REFERENCE, "noise_multiplier": 0.0}) == math.inf


def test_noise_multiplier_solves_for_the_budget():
    z = noise_multiplier(target_epsilon=2.1014, sample_rate=0.01, rounds=1000, delta=1e-5)
    assert z == pytest.approx(1.0, abs=2e-3)
    z8 = noise_multiplier(target_epsilon=8.0, sample_rate=0.1, rounds=50, delta=1e-5)
    assert epsilon(noise_multiplier=z8, sample_rate=0.1, rounds=50, delta=1e-5) == pytest.approx(8.0, rel=1e-3)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"sample_rate": 0.0}, "sample rate must be in"),
        ({"sample_rate": 1.5}, "sample rate must be in"),
        ({"delta": 0.0}, "delta must be in"),
        ({"rounds": -1}, "rounds must be a whole number"),
        ({"noise_multiplier": -1.0}, "noise multiplier must be >= 0"),
        ({"accountant": "moments"}, "accountant must be one of rdp, pld"),
    ],
)
def test_out_of_range_values_are_config_errors(arguments, message):
    with pytest.raises(ConfigError, match=message):
        epsilon(**{**REFERENCE, **arguments})
