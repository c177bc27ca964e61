"""``fedloom serve`` and ``fedloom export`` on a real digits run: predictions over HTTP from a real server process
checked against the model evaluated directly, clear 4xx answers, and exported files read back by onnxruntime,
TorchScript and safetensors."""

from __future__ import annotations

import http.client
import json
import re
import shlex
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

import fedloom as fl
from fedloom.core.errors import ConfigError, JobError, RunStoreError
from fedloom.runtime.records import RoundRecord
from fedloom.serving import ServedModel
from fedloom.serving.export import export
from fedloom.tracking import RunRecorder, RunStore, load_params
from fedloom.tracking.recorder import checkpoint_path

# A real digits run, served by a server process and exported through ONNX Runtime and TorchScript.
pytestmark = pytest.mark.integration

pytest.importorskip("fastapi")

REQUESTS = 1000
SERVING_DOC = Path(__file__).resolve().parents[2] / "docs" / "serving.md"
SERVING = re.compile(r"^serving run (\S+) after round (\d+) \(input \[64\]\) at http://127\.0\.0\.1:(\d+)/predict$")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, fl.Run]:
    root = tmp_path_factory.mktemp("served")
    job = fl.load_job("digits")
    simulation = replace(job.simulation, num_clients=10, rounds=2, backend=fl.BackendConfig("inline"))
    return root, fl.simulate(job, simulation=simulation, runs_dir=root)


@pytest.fixture(scope="module")
def test_set() -> tuple[np.ndarray, np.ndarray]:
    data = fl.load_job("digits").load_data(None)
    return data.test.x.astype(np.float32), data.test.y


def test_the_served_model_is_the_runs_checkpoint(run) -> None:
    root, done = run
    model = ServedModel.load(RunStore(root), done.run_id)
    assert (model.server_round, model.input_shape) == (2, (64,))
    assert model.params == done.params
    earlier = ServedModel.load(RunStore(root), done.run_id, server_round=1)
    assert earlier.params == load_params(checkpoint_path(root / done.run_id, 1))
    with pytest.raises(RunStoreError, match="recorded rounds 1 to 2; there is no round 3"):
        ServedModel.load(RunStore(root), done.run_id, server_round=3)
    with pytest.raises(ConfigError, match="the checkpoint does not fit the model of job 'heart_disease'"):
        ServedModel.load(RunStore(root), done.run_id, job="heart_disease", input_shape=(64,))


def test_a_run_of_a_job_file_needs_the_file(tmp_path: Path) -> None:
    (tmp_path / "linear.py").write_text(LINEAR_JOB)
    done = fl.simulate(fl.load_job(str(tmp_path / "linear.py")), runs_dir=tmp_path)
    with pytest.raises(JobError, match="job 'linear', which is not a built-in example: give the job file with --job"):
        ServedModel.load(RunStore(tmp_path), done.run_id)


class Server:
    """``fedloom serve`` in a process of its own, on a free port, with a token."""

    def __init__(self, root: Path, run_id: str, token: str) -> None:
        command = [sys.executable, "-c", "from fedloom.cli.main import main; main()"]
        self.process = subprocess.Popen(
            [*command, "serve", run_id, "--runs", str(root), "--port", "0", "--token", token],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline().strip() if self.process.stdout else ""
        found = SERVING.match(line)
        assert found, (line, self.process.stderr.read() if self.process.stderr else "")
        self.port = int(found.group(3))
        self.token = token
        self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def post(self, body: bytes, *, content_type: str = "application/json", token: str | None = None) -> tuple[int, Any]:
        headers = {"Content-Type": content_type, "Authorization": f"Bearer {token or self.token}"}
        try:
            self.connection.request("POST", "/predict", body=body, headers=headers)
            answer = self.connection.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            # uvicorn closes a connection left idle for 5 seconds (while another test ran): open a new one
            self.connection.close()
            self.connection.request("POST", "/predict", body=body, headers=headers)
            answer = self.connection.getresponse()
        return answer.status, json.loads(answer.read())

    def predict(self, instances: list[Any]) -> tuple[int, Any]:
        return self.post(json.dumps({"instances": instances}).encode())

    def close(self) -> None:
        self.connection.close()
        self.process.terminate()
        self.process.communicate(timeout=30)


@pytest.fixture(scope="module")
def server(run) -> Iterator[Server]:
    root, done = run
    running = Server(root, done.run_id, "s3cret")
    yield running
    running.close()


def test_a_thousand_requests_get_the_models_own_outputs(server: Server, run, test_set) -> None:
    _, done = run
    picks = np.arange(REQUESTS) % len(test_set[0])  # the 360 test examples, over and over
    x, y = test_set[0][picks], test_set[1][picks]
    task = fl.load_job("digits").task
    expected = task.predict(done.params, x)
    outputs, predictions = [], []
    for example in x:
        status, answer = server.predict([example.tolist()])
        assert status == 200, answer
        assert (answer["run_id"], answer["round"]) == (done.run_id, 2)
        outputs.append(answer["outputs"][0])
        predictions.append(answer["predictions"][0])
    assert len(outputs) == REQUESTS
    np.testing.assert_allclose(np.array(outputs), expected, rtol=1e-5, atol=1e-6)
    assert predictions == np.argmax(expected, axis=1).tolist()
    evaluated = task.evaluate(done.params, fl.data.ArrayData(x, y))
    assert np.mean(np.array(predictions) == y) == pytest.approx(evaluated.metrics["accuracy"])
    status, batch = server.predict(x[:500].tolist())  # one request, many instances
    assert status == 200
    assert batch["predictions"] == predictions[:500]


def _documented_request() -> tuple[str, dict[str, str], bytes]:
    """The ``curl`` command of docs/serving.md, as written there: its address, headers and body."""
    (command,) = [line for line in SERVING_DOC.read_text().splitlines() if line.startswith("curl ")]
    args = shlex.split(command)
    url = next(arg for arg in args if arg.startswith("http"))
    headers = dict(args[i + 1].split(": ", 1) for i, arg in enumerate(args) if arg == "-H")
    return url, headers, args[args.index("-d") + 1].encode()


def test_the_documented_request_is_answered(server: Server, test_set) -> None:
    url, headers, body = _documented_request()
    assert urlsplit(url).path == "/predict"
    assert headers == {"content-type": "application/json"}
    status, answer = server.post(body, content_type=headers["content-type"])
    assert status == 200, answer
    assert len(answer["outputs"]) == len(answer["predictions"]) == 1
    # What the page says it sends: the test split's first digit, a 7, standardized as the model was trained on it.
    (instance,) = json.loads(body)["instances"]
    np.testing.assert_allclose(instance, test_set[0][0], atol=0.0051)
    assert test_set[1][0] == 7


def test_a_deployments_model_is_served_by_its_run_id(run, tmp_path: Path) -> None:
    # A deployment's folder is named by its operator; `fedloom serve` takes the run id its server printed.
    _, done = run
    config = {"job": "digits", "backend": "deployment", "rounds": 1}
    recorder, _ = RunRecorder.open(tmp_path / "runs" / "site-run", "digits", config)
    recorder.on_round(RoundRecord(1, {"fit_loss": 0.5}, (), 0.1), done.params)
    recorder.finish(done.params)
    served = Server(tmp_path / "runs", recorder.run_id, "t0ken")
    try:
        status, answer = served.predict([[0.0] * 64])
    finally:
        served.close()
    assert status == 200, answer
    assert (answer["run_id"], answer["round"]) == (recorder.run_id, 1)


@pytest.mark.parametrize(
    ("body", "content_type", "status", "says"),
    [
        (b"not json", "application/json", 400, "the body is not JSON"),
        (b'{"inputs": [[0]]}', "application/json", 400, 'a JSON object {"instances": [example, ...]}'),
        (b'{"instances": []}', "application/json", 400, "instances is empty"),
        (b'{"instances": [[1, 2, 3]]}', "application/json", 400, "instances of shape [3], but the model takes [64]"),
        (
            json.dumps({"instances": [["a"] * 64]}).encode(),
            "application/json",
            400,
            "must be numbers in the shape [64]",
        ),
        (json.dumps({"instances": [[0] * 64, [0] * 63]}).encode(), "application/json", 400, "must be numbers"),
        (b'{"instances": [[' + b",".join([b"1e999"] * 64) + b"]]}", "application/json", 400, "NaN or infinite"),
        (json.dumps({"instances": [[0] * 64] * 1025}).encode(), "application/json", 413, "send at most 1024"),
        (b"instances=1", "application/x-www-form-urlencoded", 415, "as application/json"),
        (b'{"instances": [[' + b",".join([b"NaN"] * 64) + b"]]}", "application/json", 400, "holds NaN"),
        (b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json", 400, "nested too deeply"),
    ],
    ids=["not-json", "no-instances", "empty", "shape", "strings", "ragged", "inf", "batch", "form", "nan", "deep"],
)
def test_bad_requests_get_a_4xx_that_says_why(server: Server, body, content_type, status, says) -> None:
    got, answer = server.post(body, content_type=content_type)
    assert got == status, answer
    assert says in answer["detail"]


def test_a_body_declared_too_large_is_refused_before_it_is_sent(server: Server) -> None:
    """413 from the Content-Length alone: the server answers without waiting for (or reading) 64 MiB."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as peer:
        peer.sendall(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {server.token}\r\nContent-Length: {64 * 2**20 + 1}\r\n\r\n".encode()
        )
        answer = b""
        while b"send at most" not in answer and (chunk := peer.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer
    answer = answer.decode()
    assert "send at most 67108864" in answer


def test_requests_without_the_token_are_refused(server: Server) -> None:
    status, answer = server.post(b'{"instances": [[0]]}', token="wrong")
    assert status == 401
    assert "Authorization: Bearer" in answer["detail"]


def test_onnx_torchscript_and_safetensors_exports_give_the_same_model(run, test_set, tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import torch

    root, done = run
    model = ServedModel.load(RunStore(root), done.run_id)
    x = test_set[0][:200]
    logits = model.job.task.module_with(done.params)(torch.from_numpy(x)).detach().numpy()

    onnx = export(model, "onnx", tmp_path / "model.onnx")
    assert onnx.max_difference is not None
    assert onnx.max_difference < 1e-5
    session = onnxruntime.InferenceSession(str(onnx.path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x})[0], logits, rtol=1e-5, atol=1e-5)

    scripted = export(model, "torchscript", tmp_path / "model.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch deprecates TorchScript itself
        loaded = torch.jit.load(str(scripted.path))
    np.testing.assert_allclose(loaded(torch.from_numpy(x)).detach().numpy(), logits, rtol=1e-6, atol=1e-6)

    tensors = export(model, "safetensors", tmp_path / "model.safetensors")
    assert load_params(tensors.path) == done.params


def test_a_task_without_torch_exports_only_its_params(tmp_path: Path) -> None:
    (tmp_path / "linear.py").write_text(LINEAR_JOB)
    job = fl.load_job(str(tmp_path / "linear.py"))
    done = fl.simulate(job, runs_dir=tmp_path / "runs")
    model = ServedModel.load(RunStore(tmp_path / "runs"), done.run_id, job=str(tmp_path / "linear.py"))
    assert model.input_shape == (64,)
    probabilities = model.predict(np.zeros((2, 64), np.float32))["outputs"]
    assert np.allclose(np.sum(probabilities, axis=1), 1.0)
    with pytest.raises(ConfigError, match="onnx export needs a TorchTask; job 'linear' has a LogisticRegressionTask"):
        export(model, "onnx", tmp_path / "m.onnx")
    assert load_params(export(model, "safetensors", tmp_path / "m.safetensors").path) == done.params


LINEAR_JOB = """
import fedloom as fl
from fedloom.data import load_digits

job = fl.Job(
    name="linear",
    task=fl.LogisticRegressionTask(num_features=64, num_classes=10),
    data=load_digits,
    simulation=fl.SimulationConfig(num_clients=3, rounds=1),
)
"""
