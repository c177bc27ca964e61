import pytest

from fedloom.core import ConfigError, FitConfig, PartitionConfig, SimulationConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"local_epochs": None, "local_steps": None}, "exactly one of local_epochs and local_steps"),
        ({"local_epochs": 1, "local_steps": 3}, "exactly one of local_epochs and local_steps"),
        ({"local_epochs": 0}, "local_epochs must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"lr": 0.0}, "learning rate must be > 0"),
    ],
)
def test_fit_config_rejects(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FitConfig(**kwargs)


def test_fit_config_metadata_round_trip():
    config = FitConfig(local_epochs=None, local_steps=7, batch_size=4, lr=0.5, seed=11)
    assert FitConfig.from_metadata(config.to_metadata()) == config
    with pytest.raises(ConfigError, match="invalid fit config"):
        FitConfig.from_metadata({"lr": 0.1})


def test_partition_and_simulation_configs_reject_bad_values():
    with pytest.raises(ConfigError, match="unknown partition scheme 'zipf'"):
        PartitionConfig(scheme="zipf")
    with pytest.raises(ConfigError, match="alpha must be > 0, got 0"):
        PartitionConfig(scheme="dirichlet", alpha=0)
    with pytest.raises(ConfigError, match="dropout must be in"):
        SimulationConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="num_clients must be >= 1"):
        SimulationConfig(num_clients=0)


@pytest.mark.parametrize(
    ("partition", "label"),
    [
        (PartitionConfig("dirichlet"), "dirichlet (alpha 0.5)"),
        (PartitionConfig("dirichlet", alpha=0.05), "dirichlet (alpha 0.05)"),
        (PartitionConfig("quantity", alpha=2.0), "quantity (alpha 2)"),
        (PartitionConfig("shards", shards_per_client=3), "shards (3 per client)"),
        (PartitionConfig("iid", alpha=0.3), "iid"),  # alpha does not shape an iid split: not shown
        (PartitionConfig("natural"), "natural"),
    ],
)
def test_a_partition_is_labelled_with_the_parameters_its_scheme_uses(partition, label):
    assert partition.label() == label


def test_configs_are_frozen():
    config = SimulationConfig()
    with pytest.raises(AttributeError):
        config.rounds = 3  # type: ignore[misc]
