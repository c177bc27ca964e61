"""A job's digest (``fedloom.app.jobdigest``): the same job gives the same digest wherever its file lies, and an
edit that changes results, even one that keeps every shape, changes it and is named."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest

import fedloom
from fedloom.app.job import Job, describe, load_job
from fedloom.app.jobdigest import JOB_RECORD, bind_job, job_digest
from fedloom.core.errors import ConfigError
from fedloom.data import load_digits
from fedloom.task.torch_task import TorchTask

JOB = """\
from torch import nn

import fedloom as fl
from fedloom.data import load_digits


def mlp():
    return nn.Sequential(nn.Linear(64, {hidden}), nn.{activation}(), nn.Linear({hidden}, 10))


job = fl.Job(name="mlp", task=fl.TorchTask(model=mlp), data=load_digits, strategy=fl.FedAvg(fraction=1.0))
"""


def write_job(folder: Path, *, hidden: int = 32, activation: str = "ReLU", text: str = JOB) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.py"
    path.write_text(text.format(hidden=hidden, activation=activation))
    return path


def test_the_same_job_file_in_two_folders_has_one_digest_and_no_path_in_it(tmp_path: Path):
    first = job_digest(load_job(str(write_job(tmp_path / "server"))))
    second = job_digest(load_job(str(write_job(tmp_path / "site" / "elsewhere"))))
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", first.sha256)
    assert first.sha256 == second.sha256
    assert first.parts == second.parts
    text = json.dumps(first.parts)
    assert str(tmp_path) not in text
    assert "fedloom_job_" not in text  # the job file's module is named after its path; describe() hides it
    assert first.parts["task"]["model"] == "<job file>.mlp"
    assert first.parts["model"] == {
        "0.weight": "float32[32,64]",
        "0.bias": "float32[32]",
        "2.weight": "float32[10,32]",
        "2.bias": "float32[10]",
    }
    assert first.parts["layers"]["1"] == "ReLU()"


def test_an_activation_that_keeps_every_shape_changes_the_digest_and_is_named(tmp_path: Path):
    before = job_digest(load_job(str(write_job(tmp_path / "a"))))
    after = job_digest(load_job(str(write_job(tmp_path / "b", activation="Tanh"))))
    assert after.sha256 != before.sha256
    assert after.parts["model"] == before.parts["model"]  # every shape is the same
    changes = after.changes(before.parts)
    assert len(changes) == 2, changes
    assert re.fullmatch(r"the job file changed \(sha256 [0-9a-f]{12}… then, [0-9a-f]{12}… now\)", changes[0])
    assert changes[1] == "the model's layer 1 is Tanh() now, ReLU() then"


def test_a_wider_layer_names_the_parameters_whose_shapes_changed(tmp_path: Path):
    before = job_digest(load_job(str(write_job(tmp_path / "a"))))
    after = job_digest(load_job(str(write_job(tmp_path / "b", hidden=48))))
    changes = after.changes(before.parts)
    assert "the model's parameter 0.weight is float32[48,64] now, float32[32,64] then" in changes
    assert "the model's parameter 2.weight is float32[10,48] now, float32[10,32] then" in changes
    assert (
        "the model's layer 0 is Linear(in_features=64, out_features=48, bias=True) now, "
        "Linear(in_features=64, out_features=32, bias=True) then"
    ) in changes


def test_a_built_in_example_is_its_name_and_the_fedloom_version():
    first, again = job_digest(load_job("digits")), job_digest(load_job("digits"))
    assert first.parts["source"] == {"example": "digits", "fedloom": fedloom.__version__}
    assert first.sha256 == again.sha256
    newer = {**first.parts, "source": {"example": "digits", "fedloom": "99.0"}}
    assert first.changes(newer) == [
        f"fedloom is version {fedloom.__version__} now, 99.0 then (a built-in job is the version's own)"
    ]


def test_a_module_the_job_file_imports_from_its_folder_is_in_the_digest(tmp_path: Path, monkeypatch):
    helper = "jobdigest_test_layers"
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / f"{helper}.py").write_text("from torch import nn\n\nACTIVATION = nn.ReLU\n")
    text = JOB.replace("from torch import nn\n", f"from torch import nn\n\nfrom {helper} import ACTIVATION\n")
    path = write_job(folder, text=text.replace("nn.{activation}()", "ACTIVATION()"))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    try:
        before = job_digest(load_job(str(path)))
        assert list(before.parts["source"]["imports"]) == [f"{helper}.py"]
        (folder / f"{helper}.py").write_text("from torch import nn\n\nACTIVATION = nn.Tanh  # was ReLU\n")
        del sys.modules[helper]
        after = job_digest(load_job(str(path)))
    finally:
        sys.modules.pop(helper, None)
    assert after.sha256 != before.sha256
    changes = after.changes(before.parts)
    assert changes[0].startswith(f"{helper}.py, which the job file imports, changed (sha256 ")
    assert "the model's layer 1 is Tanh() now, ReLU() then" in changes


def test_the_device_a_site_trains_on_is_not_in_the_digest():
    task = TorchTask(model=lambda: __import__("torch").nn.Linear(4, 2))
    on_cpu = Job(task=task, data=load_digits)
    elsewhere = dataclasses.replace(on_cpu, task=dataclasses.replace(task, device="meta"))
    params = task.init_params(0)
    assert describe(on_cpu.task) != describe(elsewhere.task)
    assert job_digest(elsewhere, params).sha256 == job_digest(on_cpu, params).sha256
    assert job_digest(on_cpu, params).parts["source"] == {}  # a Job made in Python has no source


def test_a_run_directory_is_bound_to_its_job_and_refuses_another_naming_what_changed(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = job_digest(load_job(str(write_job(tmp_path / "a"))))
    bind_job(run_dir, first)
    recorded = json.loads((run_dir / JOB_RECORD).read_text())
    assert recorded == {"digest": first.sha256, "parts": json.loads(json.dumps(first.parts))}
    bind_job(run_dir, first)  # the same job resumes
    edited = job_digest(load_job(str(write_job(tmp_path / "b", activation="Tanh"))))
    with pytest.raises(ConfigError) as refused:
        bind_job(run_dir, edited)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(
        f"the run in {run_dir} was started with another job ({first.sha256} then, {edited.sha256} now): the job file "
    )
    assert "; the model's layer 1 is Tanh() now, ReLU() then. " in message
    assert message.endswith(
        f"give a new --run-dir (with --from-checkpoint {run_dir} to start from this run's model, where its "
        "parameters still fit)"
    )
    assert json.loads((run_dir / JOB_RECORD).read_text())["digest"] == first.sha256  # still the run's own
