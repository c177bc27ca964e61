"""What a client tells the server about itself beside its result: system metrics, custom metrics, log lines.

Client side, :func:`fedloom.runtime.handle_instruction` answers every instruction inside :func:`measure`, which

- measures the phase: the client's own seconds on it (``sys_compute_seconds``), the CPU seconds of its process
  (``sys_cpu_seconds``), the process's peak resident memory during it (``sys_peak_rss_mb``; Linux resets the
  peak before each instruction, elsewhere it is the process's peak so far), and where the task uses a CUDA device
  through torch, the peak memory torch allocated on it (``sys_gpu_peak_mb``) and the device's utilization when
  the phase ended (``sys_gpu_util``, where torch can read it); a deployed client adds the seconds its
  instruction took to arrive (``sys_download_seconds``), and the server the seconds the reply took to come
  (``sys_upload_seconds``);
- keeps what user code logs with :data:`context` (``fedloom.context.log_metric("grad_norm", 0.7)``);
- collects the log records at ``INFO`` or above that the thread running the phase makes (at most
  :data:`MAX_LINES` per reply, each cut to :data:`MAX_LINE_CHARS` characters). A logger makes a record only
  at a level it is enabled for: ``fedloom simulate``, ``fedloom client`` and simulation workers enable
  ``INFO`` (the console still shows warnings only); a program calling :func:`fedloom.simulate` itself decides
  with its own logging setup (``logging.basicConfig(level=logging.INFO)``).

All of it rides in the reply's metadata under :data:`TELEMETRY_KEY`, whatever the reply's kind (secure
aggregation's steps too), within the limits this module sets (:data:`MAX_LINES`, :data:`MAX_METRICS`,
:data:`METRIC_NAME`...). The server reads and checks it with :mod:`fedloom.runtime.readings`, which holds it to
the same limits. The vectorized simulation backend trains many clients in one batched call, so its clients
report no telemetry (their instructions that run as inline ones do).
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from fedloom.core.errors import ConfigError
from fedloom.core.message import Message, MessageKind
from fedloom.core.strictjson import finite_float

__all__ = [
    "MAX_LINES",
    "MAX_LINE_CHARS",
    "MAX_METRICS",
    "MAX_NAME_CHARS",
    "METRIC_NAME",
    "TELEMETRY_KEY",
    "ClientContext",
    "context",
    "cut_text",
    "failure_message",
    "measure",
]

log = logging.getLogger(__name__)

TELEMETRY_KEY = "telemetry"
MAX_LINES = 200  # per reply; a client that logs more sends the first ones and a line saying how many it kept back
MAX_LINE_CHARS = 4000
MAX_METRICS = 64  # custom metrics per instruction
MAX_NAME_CHARS = 100  # of a metric, and of a log line's logger
_SYSTEM_PREFIX = "sys_"
# What MLflow and TensorBoard both take as a metric's name.
METRIC_NAME = re.compile(rf"[A-Za-z0-9_.\-/ ]{{1,{MAX_NAME_CHARS}}}")
_MB = 2**20


@dataclass
class _Capture:
    """What one instruction's telemetry gathers while it runs."""

    phase: str
    server_round: int | None
    send_logs: bool
    thread: int
    metrics: dict[str, float] = field(default_factory=dict)
    lines: list[list[Any]] = field(default_factory=list)
    held_back: int = 0

    def take(self, record: logging.LogRecord) -> None:
        if not self.send_logs or record.thread != self.thread:
            return
        if len(self.lines) >= MAX_LINES - 1:
            self.held_back += 1
            return
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + _FORMATTER.formatException(record.exc_info)
        self.lines.append([record.created, record.levelname, record.name[:MAX_NAME_CHARS], cut_text(text)])

    def share(self, clients: int) -> _Capture:
        """One of ``clients`` clients' part of this measurement, where they were answered together: seconds split
        evenly, peaks (the process's, the device's) and the rest as measured. No lines: whose would they be?"""
        part = _Capture(self.phase, self.server_round, send_logs=False, thread=self.thread)
        part.metrics = {k: v / clients if k.endswith("_seconds") else v for k, v in self.metrics.items()}
        return part

    def attach(self, reply: Message) -> Message:
        """``reply`` with this instruction's telemetry in its metadata."""
        lines = list(self.lines)
        if self.held_back:
            note = f"{self.held_back} more log lines of this {self.phase} were not sent (at most {MAX_LINES})"
            lines.append([time.time(), "WARNING", __name__, note])
        payload: dict[str, Any] = {"metrics": self.metrics}
        if lines:
            payload["logs"] = lines
        return Message(reply.kind, reply.params, {**reply.metadata, TELEMETRY_KEY: payload})


try:
    import resource as _resource
except ImportError:  # Windows
    _resource = None  # type: ignore[assignment]

_FORMATTER = logging.Formatter()
_current: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar("fedloom_telemetry", default=None)


def cut_text(text: str) -> str:
    """``text`` cut to :data:`MAX_LINE_CHARS` characters (its last one an ellipsis where it was cut)."""
    return text if len(text) <= MAX_LINE_CHARS else text[: MAX_LINE_CHARS - 1] + "…"


_install_lock = threading.Lock()
_installed = False


def _install() -> None:
    """Wrap logging's record factory, once, so that each record made in a thread answering an instruction goes to
    that instruction too. A factory rather than a handler: a handler on the root logger would be one more place
    records go, and Python's last-resort printing of warnings in a program that set up no logging would stop."""
    global _installed
    if _installed:  # every instruction asks; only the first takes the lock
        return
    with _install_lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            capture = _current.get()
            if capture is not None and record.levelno >= logging.INFO:
                capture.take(record)
            return record

        logging.setLogRecordFactory(make_record)
        _installed = True


class ClientContext:
    """What user code can ask and tell fedloom while fedloom runs it on a client: ``fedloom.context``.

    >>> import fedloom
    >>> fedloom.context.log_metric("grad_norm", 0.73)   # inside a task's fit or evaluate   # doctest: +SKIP

    Outside an instruction (a task called by hand) there is nothing to report to: :meth:`log_metric` drops the
    value, with a warning the first time.
    """

    _warned = False

    def log_metric(self, name: str, value: float) -> None:
        """Record ``value`` under ``name`` for this client's current fit or evaluation; the server stores it in
        the client's record for the round (run store, dashboard, exporters). Logged again under the same name,
        the last value counts. The strategy does not see it: a metric the aggregation needs belongs in the
        task's :class:`~fedloom.FitResult` metrics, which win over a custom metric of the same name.

        Raises :class:`ConfigError` for a name that is not a string of 1 to 100 characters, a ``sys_`` name
        (fedloom's own), a value that is not a finite number, or more than 64 metrics in one instruction. Names
        hold letters, digits, ``_ - . /`` and spaces, as MLflow and TensorBoard take them."""
        if not isinstance(name, str) or not METRIC_NAME.fullmatch(name):
            raise ConfigError(
                f"a metric name must be 1 to {MAX_NAME_CHARS} letters, digits, '_', '-', '.', '/' or spaces, "
                f"got {name!r}"
            )
        if name.startswith(_SYSTEM_PREFIX):
            raise ConfigError(f"metric names starting with {_SYSTEM_PREFIX!r} are fedloom's own; rename {name!r}")
        number = finite_float(value)
        if number is None:
            raise ConfigError(f"metric {name!r} must be a finite number, got {value!r}")
        capture = _current.get()
        if capture is None:
            if not ClientContext._warned:
                ClientContext._warned = True
                log.warning("log_metric(%r) outside a fit or evaluation that fedloom runs: nothing records it", name)
            return
        if name not in capture.metrics and len(capture.metrics) >= MAX_METRICS:
            raise ConfigError(f"at most {MAX_METRICS} custom metrics per {capture.phase}; {name!r} is one too many")
        capture.metrics[name] = number

    @property
    def server_round(self) -> int | None:
        """The round of the instruction this client is running, or ``None`` outside one."""
        capture = _current.get()
        return None if capture is None else capture.server_round

    @property
    def phase(self) -> str | None:
        """The kind of instruction this client is running (``fit``, ``evaluate``, a secure aggregation step),
        or ``None`` outside one."""
        capture = _current.get()
        return None if capture is None else capture.phase


context = ClientContext()


def active() -> bool:
    """Whether this thread is inside :func:`measure` already (a protocol step that trains, for instance)."""
    return _current.get() is not None


@contextmanager
def measure(
    instruction: Message | tuple[str, int | None],
    *,
    received_seconds: float | None = None,
    send_logs: bool = True,
) -> Iterator[_Capture]:
    """Measure the answer to ``instruction`` (or to a ``(kind, round)`` of instructions) and collect what it logs;
    :meth:`_Capture.attach` puts the result into the reply. ``received_seconds`` is how long the instruction took
    to arrive, where the runtime knows. Several clients answered in one call (the vectorized backend's chunk)
    share one measurement: see :meth:`_Capture.share`."""
    if isinstance(instruction, Message):
        phase, server_round = instruction.kind, instruction.metadata.get("round")
    else:
        phase, server_round = instruction
    capture = _Capture(
        phase=phase,
        server_round=server_round if isinstance(server_round, int) else None,
        send_logs=send_logs,
        thread=threading.get_ident(),
    )
    _install()
    token = _current.set(capture)
    peak_reset = _reset_peak_rss()
    _reset_gpu_peak()
    cpu, wall = _cpu_seconds(), time.perf_counter()
    try:
        yield capture
    finally:
        _current.reset(token)
        measured = {
            "sys_compute_seconds": time.perf_counter() - wall,
            "sys_cpu_seconds": _cpu_seconds() - cpu,
            "sys_peak_rss_mb": _peak_rss_mb(peak_reset),
            **_gpu(),
        }
        if received_seconds is not None:
            measured["sys_download_seconds"] = received_seconds
        # custom metrics were checked as they came; system ones are set last, so they cannot be overridden
        capture.metrics.update({k: v for k, v in measured.items() if v is not None})


def failure_message(error: BaseException) -> Message:
    """The reply of a deployed client whose task raised ``error``: the server records it as dropped at once
    (instead of at the round's deadline), with the error as the record's detail."""
    return Message(MessageKind.FAILURE, metadata={"error": cut_text(f"{type(error).__name__}: {error}")})


def _cpu_seconds() -> float:
    """The CPU seconds this process has used (user and system). ``getrusage`` where there is one: on a machine
    with many threads ``time.process_time`` costs tens of microseconds a call, against one."""
    if _resource is None:
        return time.process_time()
    usage = _resource.getrusage(_resource.RUSAGE_SELF)
    return float(usage.ru_utime + usage.ru_stime)


class _Proc:
    """This process's ``/proc`` files for its peak RSS (Linux), opened once per process: opening them for each
    instruction cost more than the rest of the measurement together."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.clear = os.open("/proc/self/clear_refs", os.O_WRONLY)
        try:
            self.status = os.open("/proc/self/status", os.O_RDONLY)
        except OSError:
            os.close(self.clear)
            raise


_proc: _Proc | None = None
_proc_lock = threading.Lock()


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux); whether that worked (elsewhere, or where ``/proc`` refuses, not)."""
    global _proc
    try:
        with _proc_lock:
            if _proc is None or _proc.pid != os.getpid():  # a forked child opens its own
                _proc = _Proc()
        os.write(_proc.clear, b"5")
        return True
    except OSError:
        return False


def _peak_rss_mb(was_reset: bool) -> float | None:
    if was_reset and _proc is not None:
        try:
            status = os.pread(_proc.status, 1 << 14, 0)
            start = status.index(b"VmHWM:") + 6
            return int(status[start : status.index(b"kB", start)]) / 1024
        except (OSError, ValueError):
            pass
    if _resource is None:
        return None
    peak = _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss
    return peak / _MB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _cuda() -> Any:
    """torch.cuda where the task has initialized CUDA (torch is never imported here), else ``None``."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return torch.cuda if torch.cuda.is_initialized() else None
    except Exception:
        return None


def _reset_gpu_peak() -> None:
    cuda = _cuda()
    if cuda is not None:
        with suppress(Exception):  # a broken CUDA setup must not fail the client's reply
            cuda.reset_peak_memory_stats()


def _gpu() -> dict[str, float | None]:
    cuda = _cuda()
    if cuda is None:
        return {}
    out: dict[str, float | None] = {}
    with suppress(Exception):
        out["sys_gpu_peak_mb"] = cuda.max_memory_allocated() / _MB
    with suppress(Exception):
        out["sys_gpu_util"] = float(cuda.utilization())  # needs NVIDIA's management library (pynvml)
    return out
