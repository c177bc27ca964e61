"""The names that the commands' help lists, written out here so that ``fedloom --help`` imports no algorithm,
no accountant and no numpy (``tests/cli/test_startup.py`` checks that they are the library's own)."""

from __future__ import annotations

# fedloom.strategy.catalog.STRATEGIES, in its order
STRATEGY_NAMES = (
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadagrad",
    "fedadam",
    "fedyogi",
    "scaffold",
    "fednova",
    "qffl",
    "median",
    "trimmed_mean",
    "krum",
    "bulyan",
    "fedper",
    "fedrep",
    "fedbn",
    "ditto",
    "ifca",
    "fedbuff",
)
# fedloom.core.graphs.TOPOLOGIES
TOPOLOGIES = ("ring", "regular", "full")
# fedloom.privacy.accounting.ACCOUNTANTS
ACCOUNTANTS = ("rdp", "pld")
