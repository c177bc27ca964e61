"""``ServedModel``: a run's global model after one of its rounds, ready to predict (``fedloom serve``) or export.

It is the job's task (the code that built the model) with the params of the run's checkpoint. The job is the
one the run was made with when that is a built-in example; a run of a job file needs the file again
(``job=``). The shape one example must have comes from the job's data (its test split) unless given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedloom.app.job import Job, builtin_examples, load_job
from fedloom.core.checkpoint import load_params
from fedloom.core.errors import ConfigError, DataError, JobError, RunStoreError
from fedloom.core.params import Params
from fedloom.data.base import Dataset
from fedloom.tracking.recorder import checkpoint_path
from fedloom.tracking.store import RunStore

__all__ = ["MAX_BATCH", "RequestError", "ServedModel"]

MAX_BATCH = 1024  # instances per request


class RequestError(ValueError):
    """A prediction request that cannot be answered, with the HTTP status to answer it with and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServedModel:
    """The global model of run ``run_id`` after round ``server_round``: ``job``'s task with ``params``.
    ``input_shape`` is one example's shape."""

    run_id: str
    server_round: int
    job: Job
    params: Params
    input_shape: tuple[int, ...]

    @classmethod
    def load(
        cls,
        store: RunStore,
        ref: str,
        *,
        server_round: int | None = None,
        job: str | None = None,
        data_dir: str | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> ServedModel:
        """The model of the run ``ref`` names after ``server_round`` (default: its last recorded round).

        Raises :class:`RunStoreError` for an unknown run or a round it did not record, :class:`JobError` when the
        run's job cannot be found (give ``job``, a job file or example name), and :class:`ConfigError` when the
        checkpoint does not fit the job's model or the task cannot predict.
        """
        info = store.info(ref)
        if info.rounds == 0:
            raise RunStoreError(f"run {info.run_id} recorded no round yet: it has no model to serve")
        chosen = info.rounds if server_round is None else server_round
        if not 1 <= chosen <= info.rounds:
            raise RunStoreError(f"run {info.run_id} recorded rounds 1 to {info.rounds}; there is no round {chosen}")
        path = checkpoint_path(store.run_dir(ref), chosen)
        if not path.is_file():
            raise RunStoreError(f"run {info.run_id} has no checkpoint of round {chosen} ({path} is missing)")
        loaded = _job(store.config(ref).get("job"), job)
        if not callable(getattr(loaded.task, "predict", None)):
            raise ConfigError(
                f"the task of job {loaded.name!r} ({type(loaded.task).__name__}) cannot predict: give it a "
                "predict(params, x) method returning the model's outputs (TorchTask and LogisticRegressionTask do)"
            )
        params = load_params(path)
        _check_fits(params, loaded)
        shape = tuple(input_shape) if input_shape is not None else _input_shape(loaded, data_dir)
        return cls(info.run_id, chosen, loaded, params, shape)

    def instances(self, raw: Any) -> npt.NDArray[np.float32]:
        """The examples of a request's ``instances`` (a list of examples of :attr:`input_shape`), as one array;
        raises :class:`RequestError` (400, or 413 for too many) saying what is wrong."""
        if not isinstance(raw, list):
            raise RequestError(400, 'the body must be a JSON object {"instances": [example, ...]}')
        if not raw:
            raise RequestError(400, "instances is empty: send at least one example")
        if len(raw) > MAX_BATCH:
            raise RequestError(413, f"{len(raw)} instances in one request; send at most {MAX_BATCH}")
        try:
            array = np.asarray(raw, dtype=np.float64)
        except (ValueError, TypeError):
            raise RequestError(
                400, f"every instance must be numbers in the shape {list(self.input_shape)}, the model's input"
            ) from None
        if array.shape[1:] != self.input_shape:
            raise RequestError(
                400,
                f"instances of shape {list(array.shape[1:])}, but the model takes {list(self.input_shape)}",
            )
        if not np.isfinite(array).all():
            raise RequestError(400, "instances hold NaN or infinite values")
        return array.astype(np.float32)

    def predict(self, x: npt.NDArray[np.float32]) -> dict[str, Any]:
        """The answer to a request: the model's ``outputs`` per instance (class probabilities for a classifier)
        and, for a classifier, its ``predictions`` (the most probable class, or ``prob > 0.5`` for one output)."""
        outputs = np.asarray(self.job.task.predict(self.params, x))  # type: ignore[attr-defined]
        answer: dict[str, Any] = {"run_id": self.run_id, "round": self.server_round, "outputs": outputs.tolist()}
        if outputs.ndim == 2 and outputs.shape[1] > 1:
            answer["predictions"] = np.argmax(outputs, axis=1).tolist()
        elif outputs.ndim == 1:
            answer["predictions"] = (outputs > 0.5).astype(int).tolist()
        return answer

    def describe(self) -> dict[str, Any]:
        """What is served: run, round, job, input shape and the params' digest."""
        return {
            "run_id": self.run_id,
            "round": self.server_round,
            "job": self.job.name,
            "task": type(self.job.task).__name__,
            "input_shape": list(self.input_shape),
            "params_sha256": self.params.sha256(),
            "max_batch": MAX_BATCH,
        }


def _job(recorded: Any, given: str | None) -> Job:
    if given is not None:
        return load_job(given)
    if isinstance(recorded, str) and recorded in builtin_examples():
        return load_job(recorded)
    raise JobError(
        f"the run was made by job {recorded!r}, which is not a built-in example: give the job file with --job"
    )


def _check_fits(params: Params, job: Job) -> None:
    model = job.task.init_params(0)
    expected = {name: tuple(array.shape) for name, array in model.items()}
    got = {name: tuple(array.shape) for name, array in params.items()}
    if expected != got:
        differ = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))[:3]
        shown = ", ".join(f"{k}: {got.get(k)} in the checkpoint, {expected.get(k)} in the model" for k in differ)
        raise ConfigError(f"the checkpoint does not fit the model of job {job.name!r} ({shown}); is it the right job?")


def _input_shape(job: Job, data_dir: str | None) -> tuple[int, ...]:
    """One example's shape, from the job's test data (or its train data where it has no test split)."""
    try:
        loaded = job.load_data(data_dir)
    except (DataError, JobError, ConfigError) as exc:
        raise ConfigError(
            f"cannot read the shape of an example from job {job.name!r}'s data ({exc}); give --data, or --input-shape"
        ) from None
    if isinstance(loaded, Dataset):
        split = loaded.test if len(loaded.test) else loaded.train
        return tuple(int(n) for n in split.x.shape[1:])
    central = loaded.central_test
    if central is None or not len(central):
        raise ConfigError(
            f"job {job.name!r}'s data has no test set to read an example's shape from: give --input-shape"
        )
    return tuple(int(n) for n in central.x.shape[1:])
