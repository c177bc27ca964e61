"""The public API is exactly these names; changing it is a decision, made here on purpose."""

import subprocess
import sys

import pytest

import fedloom

EXPECTED = {
    "AttackConfig",
    "BackendConfig",
    "ClientTLS",
    "ConfigError",
    "DPSettings",
    "DataError",
    "DecodeError",
    "EvalResult",
    "FedAvg",
    "FedloomError",
    "FitConfig",
    "FitResult",
    "Job",
    "JobError",
    "LogisticRegressionTask",
    "Message",
    "NotEnoughClientsError",
    "Params",
    "PartitionConfig",
    "PrivacySettings",
    "Run",
    "RunStore",
    "RunStoreError",
    "ServerTLS",
    "SimulationConfig",
    "Strategy",
    "SystemConfig",
    "Task",
    "TorchTask",
    "__version__",
    "connect",
    "context",
    "data",
    "decode_message",
    "decode_params",
    "encode_message",
    "encode_params",
    "load_job",
    "serve",
    "simulate",
    "simulate_gossip",
}


def test_exported_names_are_pinned():
    assert set(fedloom.__all__) == EXPECTED


def test_every_exported_name_resolves():
    for name in fedloom.__all__:
        assert getattr(fedloom, name) is not None, name


def test_errors_share_one_root():
    for name in ("ConfigError", "DataError", "DecodeError", "JobError", "NotEnoughClientsError", "RunStoreError"):
        assert issubclass(getattr(fedloom, name), fedloom.FedloomError)


@pytest.mark.integration
def test_importing_fedloom_does_not_import_torch():
    code = "import fedloom, sys; assert 'torch' not in sys.modules; fedloom.TorchTask; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
