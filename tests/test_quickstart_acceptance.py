"""The quickstart's own settings reach the accuracy the README promises (the timing is in benchmarks/RESULTS.md)."""

import pytest
import torch

import fedloom as fl

# The quickstart's 100 clients trained to the promised accuracy.
pytestmark = pytest.mark.integration


def test_quickstart_reaches_90_percent_central_accuracy(tmp_path):
    job = fl.load_job("digits")
    assert job.simulation.num_clients == 100
    assert job.simulation.partition == fl.PartitionConfig(scheme="dirichlet", alpha=0.5)
    assert job.strategy.fraction == 1.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `fedloom simulate` does
    try:
        run = fl.simulate(job, runs_dir=tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert run.final_metrics["central_accuracy"] >= 0.90
    assert all(len([c for c in r.clients if c.phase == "fit"]) == 100 for r in run.history)
