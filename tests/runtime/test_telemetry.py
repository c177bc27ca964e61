"""A client's telemetry: what it measures about each instruction, what user code logs through ``fedloom.context``,
the lines it logs, and how the server checks all of it before keeping it."""

from __future__ import annotations

import logging
import sys
import threading
import time
from datetime import timezone

import numpy as np
import pytest

import fedloom
from fedloom.core.config import FitConfig
from fedloom.core.errors import ConfigError
from fedloom.core.message import Message
from fedloom.core.results import evaluate_message, fit_message
from fedloom.data.base import ArrayData, ClientData
from fedloom.runtime import Context, client_app, readings, telemetry
from fedloom.runtime.readings import Telemetry
from fedloom.runtime.telemetry import MAX_LINES, TELEMETRY_KEY
from fedloom.task import LogisticRegressionTask

log = logging.getLogger("tests.telemetry")

TASK = LogisticRegressionTask(num_features=4, num_classes=2)
RNG = np.random.default_rng(0)
DATA = ClientData(
    ArrayData(RNG.normal(size=(40, 4)).astype(np.float32), RNG.integers(0, 2, 40)),
    ArrayData(RNG.normal(size=(10, 4)).astype(np.float32), RNG.integers(0, 2, 10)),
)
FIT = fit_message(3, TASK.init_params(0), FitConfig(local_epochs=1, batch_size=8, lr=0.1))


class Scripted:
    """The logistic regression task, running ``before`` (a function of nothing) at the start of each fit."""

    def __init__(self, before):
        self.before = before

    def init_params(self, seed):
        return TASK.init_params(seed)

    def fit(self, params, data, config, **kwargs):
        self.before()
        return TASK.fit(params, data, config, **kwargs)

    def evaluate(self, params, data):
        return TASK.evaluate(params, data)


@pytest.fixture(autouse=True)
def info_level():
    """Loggers make INFO records here, as under the fedloom command."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.INFO)
    yield
    root.setLevel(before)


def answer(before=lambda: None, message: Message = FIT) -> tuple[Message, Telemetry]:
    reply = client_app(Scripted(before))(message, Context("site", DATA))
    return reply, readings.read(reply, "site")


def test_a_fit_reply_carries_what_the_user_logged_and_what_the_client_measured():
    def before():
        log.info("round %s, phase %s", fedloom.context.server_round, fedloom.context.phase)
        log.debug("not sent: below INFO")
        fedloom.context.log_metric("grad_norm", np.float32(0.25))
        fedloom.context.log_metric("grad_norm", 0.5)  # the last value counts
        fedloom.context.log_metric("batches", 5)

    reply, sent = answer(before)
    assert reply.kind == "fit.result"
    assert [line.message for line in sent.logs] == ["round 3, phase fit"]
    line = sent.logs[0]
    assert (line.level, line.logger) == ("INFO", "tests.telemetry")
    assert line.at.tzinfo == timezone.utc
    assert abs(line.at.timestamp() - time.time()) < 60
    assert (sent.metrics["grad_norm"], sent.metrics["batches"]) == (0.5, 5.0)
    assert sent.metrics["sys_compute_seconds"] > 0
    assert sent.metrics["sys_cpu_seconds"] >= 0
    assert sent.metrics["sys_peak_rss_mb"] > 10  # a Python process with NumPy holds tens of MB
    assert "sys_download_seconds" not in sent.metrics  # nothing was downloaded in process
    assert (fedloom.context.server_round, fedloom.context.phase) == (None, None)  # outside, again


def test_an_evaluation_is_measured_too_and_the_result_is_untouched():
    reply, sent = answer(message=evaluate_message(2, TASK.init_params(0)))
    direct = TASK.evaluate(TASK.init_params(0), DATA.test)
    assert reply.metadata["loss"] == direct.loss
    assert set(reply.metadata) == {"loss", "num_examples", "metrics", TELEMETRY_KEY}
    assert sent.metrics["sys_compute_seconds"] > 0
    assert sent.logs == ()


def test_cpu_seconds_count_work_and_not_waiting():
    def spin():
        end = time.process_time() + 0.3
        while time.process_time() < end:
            pass

    _, busy = answer(spin)
    _, idle = answer(lambda: time.sleep(0.3))
    assert busy.metrics["sys_cpu_seconds"] >= 0.29
    assert idle.metrics["sys_cpu_seconds"] < 0.15 <= 0.3 <= idle.metrics["sys_compute_seconds"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak is reset per instruction on Linux only")
def test_peak_memory_is_the_peak_of_this_instruction():
    held = []

    def allocate():
        block = np.ones(40 * 2**20 // 8)  # 40 MiB, touched
        held.append(float(block.sum()))

    _, big = answer(allocate)
    _, small = answer()
    assert big.metrics["sys_peak_rss_mb"] - small.metrics["sys_peak_rss_mb"] > 30


def test_lines_from_other_threads_are_not_this_clients():
    def before():
        other = threading.Thread(target=lambda: log.warning("another thread's line"))
        other.start()
        other.join()
        log.warning("this client's line")

    _, sent = answer(before)
    assert [line.message for line in sent.logs] == ["this client's line"]


def test_a_traceback_logged_by_user_code_is_sent_with_its_line():
    def before():
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            log.exception("the batch failed")

    _, sent = answer(before)
    (line,) = sent.logs
    assert line.level == "ERROR"
    assert line.message.startswith("the batch failed\nTraceback (most recent call last):")
    assert line.message.endswith("ZeroDivisionError: division by zero")


def test_a_chatty_client_sends_the_first_lines_and_says_how_many_it_kept_back():
    def before():
        for i in range(500):
            log.info("line %d", i)

    _, sent = answer(before)
    assert len(sent.logs) == MAX_LINES
    assert [line.message for line in sent.logs[:3]] == ["line 0", "line 1", "line 2"]
    assert sent.logs[-2].message == f"line {MAX_LINES - 2}"
    assert sent.logs[-1].level == "WARNING"
    held_back = 500 - (MAX_LINES - 1)
    assert sent.logs[-1].message == f"{held_back} more log lines of this fit were not sent (at most {MAX_LINES})"


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("sys_cpu_seconds", 1.0, "fedloom's own"),
        ("", 1.0, "1 to 100 letters"),
        ("x" * 101, 1.0, "1 to 100 letters"),
        ("grad:norm", 1.0, "1 to 100 letters"),
        ("loss_bound", float("nan"), "finite number"),
        ("flag", True, "finite number"),
        ("name", "3", "finite number"),
    ],
)
def test_log_metric_refuses_what_it_could_not_store(name, value, says):
    with pytest.raises(ConfigError, match=says):
        fedloom.context.log_metric(name, value)


def test_log_metric_outside_a_client_warns_once_and_records_nothing(caplog, monkeypatch):
    monkeypatch.setattr(telemetry.ClientContext, "_warned", False)
    with caplog.at_level(logging.WARNING, "fedloom.runtime.telemetry"):
        fedloom.context.log_metric("grad_norm", 1.0)
        fedloom.context.log_metric("grad_norm", 2.0)
    assert [r.getMessage() for r in caplog.records] == [
        "log_metric('grad_norm') outside a fit or evaluation that fedloom runs: nothing records it"
    ]


def test_too_many_custom_metrics_in_one_fit_is_an_error():
    def before():
        for i in range(telemetry.MAX_METRICS + 1):
            fedloom.context.log_metric(f"m{i}", i)

    with pytest.raises(ConfigError, match="at most 64 custom metrics per fit; 'm64' is one too many"):
        answer(before)


@pytest.mark.parametrize(
    "raw",
    [
        "text",
        {"metrics": {"x": "1"}},
        {"metrics": {"x": None}},
        {"metrics": {"": 1.0}},
        {"metrics": {"a\nb": 1.0}},
        {"metrics": {f"m{i}": 1.0 for i in range(81)}},
        {"logs": "line"},
        {"logs": [[1.0, "INFO", "x"]]},
        {"logs": [[1.0, "DEBUG", "x", "y"]]},
        {"logs": [["yesterday", "INFO", "x", "y"]]},
        {"logs": [[1e12, "INFO", "x", "y"]]},
        {"logs": [[1.0, "INFO", 3, "y"]]},
        {"logs": [[1.0, "INFO", "x", "y"]] * (MAX_LINES + 1)},
    ],
)
def test_the_server_ignores_malformed_telemetry_with_a_warning(raw, caplog):
    with caplog.at_level(logging.WARNING, "fedloom.runtime.readings"):
        assert readings.read(Message("fit.result", metadata={TELEMETRY_KEY: raw}), "site-7") == Telemetry()
    assert caplog.records[0].getMessage().startswith("client site-7 sent malformed telemetry, ignored: ")


def test_the_server_cuts_long_lines_and_names():
    raw = {"metrics": {"a": 1}, "logs": [[0.5, "ERROR", "n" * 300, "m" * 10_000]]}
    sent = readings.read(Message("fit.result", metadata={TELEMETRY_KEY: raw}), "site")
    (line,) = sent.logs
    assert (len(line.logger), len(line.message), line.message[-1]) == (100, telemetry.MAX_LINE_CHARS, "…")
    assert (line.at.timestamp(), sent.metrics) == (0.5, {"a": 1.0})


def test_the_steps_of_a_protocol_add_their_seconds_and_keep_the_highest_peak():
    first = Telemetry({"sys_compute_seconds": 1.0, "sys_peak_rss_mb": 300.0, "grad_norm": 1.0})
    second = Telemetry({"sys_compute_seconds": 0.5, "sys_peak_rss_mb": 200.0, "grad_norm": 2.0, "other": 3.0})
    assert (first + second).metrics == {
        "sys_compute_seconds": 1.5,
        "sys_peak_rss_mb": 300.0,
        "grad_norm": 2.0,
        "other": 3.0,
    }


def test_the_record_keeps_the_tasks_own_metric_over_a_custom_one_of_the_same_name():
    sent = Telemetry({"loss": 9.0, "sys_cpu_seconds": 0.1})
    assert readings.record_metrics({"loss": 0.3}, sent, upload_seconds=0.02) == {
        "loss": 0.3,
        "sys_cpu_seconds": 0.1,
        "sys_upload_seconds": 0.02,
    }


def test_a_failure_reply_names_the_error():
    reply = telemetry.failure_message(ValueError("bad batch"))
    assert readings.failure(reply) == "ValueError: bad batch"
    assert readings.failure(FIT) is None


class FakeCuda:
    """What telemetry reads of torch.cuda, for a machine without a GPU: a device the task has initialized."""

    def __init__(self) -> None:
        self.resets = 0

    def is_initialized(self) -> bool:
        return True

    def reset_peak_memory_stats(self) -> None:
        self.resets += 1

    def max_memory_allocated(self) -> int:
        return 48 * 2**20

    def utilization(self) -> int:
        return 87


def test_a_task_on_a_cuda_device_reports_its_peak_memory_and_utilization(monkeypatch):
    cuda = FakeCuda()
    monkeypatch.setitem(sys.modules, "torch", type("FakeTorch", (), {"cuda": cuda}))
    _, sent = answer()
    assert cuda.resets == 1  # the peak is this instruction's
    assert (sent.metrics["sys_gpu_peak_mb"], sent.metrics["sys_gpu_util"]) == (48.0, 87.0)


def test_a_process_without_torch_reports_no_gpu(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    _, sent = answer()
    assert "sys_gpu_peak_mb" not in sent.metrics
    assert "sys_gpu_util" not in sent.metrics
