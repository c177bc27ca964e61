"""Exporters: a run's rounds, as they are recorded, sent on to MLflow or written for TensorBoard as well.

Both map a run the same way: a federated round is a **step**; the global metrics of a round are the run's own
metrics; every client's record (fit and evaluate: loss, accuracy, seconds, bytes, the metrics it reported, its
``sys_*`` measurements) goes under the client's name as its **tag**. In MLflow the run is a parent run (named
by fedloom's run id, tagged ``fedloom.run_id``, with the config as parameters and as ``fedloom_config.json``)
and each client a child run (tagged ``fedloom.client``); in TensorBoard global metrics are scalars
``global/NAME`` and a client's are ``PHASE_NAME/CLIENT`` (one chart per metric, a line per client).

The :class:`~fedloom.tracking.RunRecorder` drives them (``exporters=`` of :func:`fedloom.simulate`,
``--mlflow-uri`` and ``--tensorboard`` of ``fedloom simulate`` and ``fedloom server``): after the run store,
never instead of it. MLflow (``fedloom[mlflow]``: ``mlflow-skinny``) and TensorBoard (``fedloom[tensorboard]``)
are imported only when an exporter starts. An exporter that cannot start is an error before the run trains; one
that fails later is logged and left out for the rest of the run, which goes on: the run store has it all.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from fedloom.core.errors import ConfigError
from fedloom.core.strictjson import finite_number
from fedloom.runtime.records import ClientRecord, ClientStatus, RoundRecord

__all__ = ["Exporter", "MlflowExporter", "TensorBoardExporter", "client_values"]

log = logging.getLogger(__name__)

_RUN_TAG = "fedloom.run_id"
_CLIENT_TAG = "fedloom.client"
_BATCH = 1000  # metrics per MLflow log_batch call (its limit)
_PARAM_BATCH = 100  # params per call
_PARAM_VALUE = 6000  # MLflow's longest param value


class Exporter(Protocol):
    """Something that mirrors a run elsewhere: :meth:`start` once (also when a deployment resumes the run),
    :meth:`on_round` after each round is in the run store, :meth:`finish` with ``finished`` or ``failed``."""

    def start(self, run_id: str, name: str, config: Mapping[str, Any]) -> None: ...

    def on_round(self, record: RoundRecord) -> None: ...

    def finish(self, status: str) -> None: ...


def client_values(record: ClientRecord) -> dict[str, float]:
    """What an exporter writes for one client record, by name (``PHASE_NAME``): its examples, loss, accuracy,
    seconds and bytes, whether it completed (``PHASE_ok``: 1 or 0), and every metric it reported; finite numbers
    only."""
    phase = record.phase
    values: dict[str, Any] = {
        "ok": 1.0 if record.status == ClientStatus.OK else 0.0,
        "num_examples": record.num_examples,
        "loss": record.loss,
        "accuracy": record.accuracy,
        "seconds": record.seconds,
        "bytes_down": record.bytes_down,
        "bytes_up": record.bytes_up,
        **record.metrics,
    }
    return {f"{phase}_{name}": float(v) for name, v in values.items() if finite_number(v)}


def _flatten(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """A nested config as dotted names and JSON-ish text values."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, f"{name}.")
        else:
            yield name, value if isinstance(value, str) else json.dumps(value)


# ---------------------------------------------------------------------------------------------- MLflow


class MlflowExporter:
    """Mirror runs into the MLflow tracking server or store at ``uri`` (``http://host:5000``, ``file:///path``,
    ``sqlite:///mlflow.db``...), in the experiment ``experiment`` (default: the job's name); ``clients=False``
    leaves the per-client child runs out (a run of thousands of clients makes thousands of them)."""

    def __init__(self, uri: str, *, experiment: str | None = None, clients: bool = True) -> None:
        if not isinstance(uri, str) or not uri:
            raise ConfigError(f"the MLflow tracking URI must be a non-empty string, got {uri!r}")
        self.uri = uri
        self.experiment = experiment
        self.clients = clients
        self._client: Any = None
        self._parent: str | None = None
        self._children: dict[str, str] = {}
        self._run_id = ""
        self._experiment_id = ""

    def start(self, run_id: str, name: str, config: Mapping[str, Any]) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError("--mlflow-uri needs MLflow: pip install 'fedloom[mlflow]'") from None
        self._run_id = run_id
        experiment_name = self.experiment or name
        try:
            client = MlflowClient(tracking_uri=self.uri)
            found = client.get_experiment_by_name(experiment_name)
            experiment_id = (
                found.experiment_id
                if found
                else client.create_experiment(experiment_name, artifact_location=_artifacts_beside(self.uri))
            )
            runs = client.search_runs([experiment_id], filter_string=f"tags.`{_RUN_TAG}` = '{run_id}'")
        except Exception as exc:  # MLflow raises its own errors, and those of the HTTP client under it
            raise ConfigError(f"cannot use the MLflow tracking store at {self.uri}: {_reason(exc)}") from None
        self._client = client
        self._experiment_id = experiment_id
        for run in runs:  # a resumed deployment: its parent run and its clients' runs are there already
            client_id = run.data.tags.get(_CLIENT_TAG)
            if client_id is None:
                self._parent = run.info.run_id
            else:
                self._children[client_id] = run.info.run_id
        if self._parent is not None:
            client.update_run(self._parent, status="RUNNING")
            return
        parent = client.create_run(experiment_id, run_name=run_id, tags={_RUN_TAG: run_id, "fedloom.job": name})
        self._parent = parent.info.run_id
        from mlflow.entities import Param

        params = [Param(key[:250], value[:_PARAM_VALUE]) for key, value in _flatten(config)]
        for i in range(0, len(params), _PARAM_BATCH):
            client.log_batch(self._parent, params=params[i : i + _PARAM_BATCH])
        client.log_text(self._parent, json.dumps(config, indent=2), "fedloom_config.json")

    def on_round(self, record: RoundRecord) -> None:
        from mlflow.entities import Metric

        step = record.server_round
        now = int(time.time() * 1000)
        assert self._parent is not None
        values = {k: float(v) for k, v in record.metrics.items() if finite_number(v)}
        values["round_seconds"] = float(record.seconds)
        self._log(self._parent, [Metric(k, v, now, step) for k, v in values.items()])
        if not self.clients:
            return
        by_client: dict[str, list[Any]] = {}
        for client_record in record.clients:
            by_client.setdefault(client_record.client_id, []).extend(
                Metric(k, v, now, step) for k, v in client_values(client_record).items()
            )
        for client_id, metrics in by_client.items():
            self._log(self._child(client_id), metrics)

    def finish(self, status: str) -> None:
        if self._client is None:
            return
        state = "FINISHED" if status == "finished" else "FAILED"
        for run_id in [self._parent, *self._children.values()]:
            if run_id is not None:
                self._client.set_terminated(run_id, state)

    def _child(self, client_id: str) -> str:
        run_id = self._children.get(client_id)
        if run_id is None:
            tags = {"mlflow.parentRunId": self._parent, _RUN_TAG: self._run_id, _CLIENT_TAG: client_id}
            run_id = self._client.create_run(self._experiment_id, run_name=client_id, tags=tags).info.run_id
            self._children[client_id] = run_id
        return run_id

    def _log(self, run_id: str, metrics: list[Any]) -> None:
        for i in range(0, len(metrics), _BATCH):
            self._client.log_batch(run_id, metrics=metrics[i : i + _BATCH])


def _artifacts_beside(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside the database of a ``sqlite:///`` store (MLflow's own
    default is ``./mlruns`` in whatever folder the run was started from); a server decides for itself."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    return (Path(uri[len(prefix) :]).resolve().parent / "mlflow-artifacts").as_uri()


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------- TensorBoard


class TensorBoardExporter:
    """Write each run's rounds as TensorBoard event files under ``log_dir/<run id>/`` (``tensorboard --logdir
    log_dir`` shows them side by side)."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer: Any = None

    def start(self, run_id: str, name: str, config: Mapping[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs TensorBoard: pip install 'fedloom[tensorboard]'") from None
        try:
            self._writer = SummaryWriter(log_dir=str(self.log_dir / run_id))
        except OSError as exc:
            raise ConfigError(f"cannot write TensorBoard files in {self.log_dir}: {exc.strerror or exc}") from None
        text = json.dumps({"run_id": run_id, "job": name, "config": config}, indent=2)
        self._writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)  # indented: shown as code

    def on_round(self, record: RoundRecord) -> None:
        writer, step = self._writer, record.server_round
        for name, value in record.metrics.items():
            if finite_number(value):
                writer.add_scalar(f"global/{name}", float(value), step)
        writer.add_scalar("global/round_seconds", float(record.seconds), step)
        for client_record in record.clients:
            for name, value in client_values(client_record).items():
                writer.add_scalar(f"{name}/{client_record.client_id}", value, step)
        writer.flush()

    def finish(self, status: str) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
