"""``fedloom privacy``: the two questions from the command line, and one-line errors."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

# Every test here runs the fedloom console script in a subprocess.
pytestmark = pytest.mark.integration

COMMON = ("--sample-rate", "0.01", "--rounds", "1000", "--delta", "1e-5")


def fedloom(*args: str) -> subprocess.CompletedProcess[str]:
    code = "from fedloom.cli.main import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, "privacy", *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize(("accountant", "expected"), [("rdp", 2.10), ("pld", 1.83)])
def test_epsilon_prints_what_dp_accounting_computes(accountant, expected):
    done = fedloom("epsilon", "--noise-multiplier", "1.0", *COMMON, "--accountant", accountant)
    assert done.returncode == 0, done.stderr
    found = re.search(r"^epsilon (\d+\.\d+) at delta 1e-05", done.stdout)
    assert found is not None, done.stdout
    assert float(found.group(1)) == pytest.approx(expected, abs=0.005)


def test_noise_solves_for_a_target_epsilon():
    done = fedloom("noise", "--target-epsilon", "2.1014", *COMMON)
    assert done.returncode == 0, done.stderr
    found = re.search(r"^noise multiplier (\d+\.\d+) \(epsilon (\d+\.\d+)", done.stdout)
    assert found is not None, done.stdout
    assert float(found.group(1)) == pytest.approx(1.0, abs=2e-3)
    assert float(found.group(2)) <= 2.1014 + 1e-3


def test_bad_values_are_one_line_errors():
    done = fedloom("epsilon", "--noise-multiplier", "1.0", "--sample-rate", "2", "--rounds", "10", "--delta", "1e-5")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: the sample rate must be in (0, 1], got 2.0"
    assert "Traceback" not in done.stderr
