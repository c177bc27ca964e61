"""Comparing runs: the config diff and the round-by-round tables, worked out by hand."""

from __future__ import annotations

from fedloom.tracking.compare import ABSENT, config_diff, flatten, metric_table, sample_rounds, shared_metrics


def test_flatten_names_nested_settings_with_dots():
    assert flatten({"a": 1, "b": {"c": 2.0, "d": {"e": "x"}}, "f": [1, 2]}) == {
        "a": 1,
        "b.c": 2.0,
        "b.d.e": "x",
        "f": "[1, 2]",
    }


def test_config_diff_lists_only_what_differs_and_counts_the_rest():
    a = {"seed": 1, "strategy": {"type": "FedAvg", "lr": 0.1}, "rounds": 5}
    b = {"seed": 2, "strategy": {"type": "FedAvg", "lr": 0.1, "mu": 0.01}, "rounds": 5}
    differ, same = config_diff([a, b])
    assert differ == [("seed", [1, 2]), ("strategy.mu", [ABSENT, 0.01])]
    assert same == 3  # rounds, strategy.lr, strategy.type
    assert config_diff([a, a]) == ([], 4)
    assert config_diff([{"x": 1}, {"x": 1.0}])[0] == [("x", [1, 1.0])]  # an int and a float are not the same setting


def test_sample_rounds_keeps_the_first_and_the_last_evenly_spaced():
    assert sample_rounds([3, 1, 2], 10) == [1, 2, 3]
    assert sample_rounds(list(range(1, 101)), 5) == [1, 26, 51, 75, 100]
    assert sample_rounds(list(range(1, 101)), 2) == [1, 100]


def test_metric_table_lines_up_runs_of_different_lengths():
    first = [{"round": 1, "acc": 0.5}, {"round": 2, "acc": 0.6}, {"round": 3, "acc": 0.7}]
    second = [{"round": 1, "acc": 0.4}, {"round": 2, "acc": None}]
    assert metric_table([first, second], "acc", 10) == [(1, [0.5, 0.4]), (2, [0.6, None]), (3, [0.7, None])]
    assert shared_metrics([first, second], ("round",)) == ["acc"]
    assert shared_metrics([first, [{"round": 1, "loss": 1.0}]], ("round",)) == []
