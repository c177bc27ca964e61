"""A job's digest: what a deployment's run and each of its sites agree on before anyone trains.

The digest names a job by what changes its results, never by where it lies on disk:

- its **source**: a job file's bytes, and the bytes of the modules loaded from its own folder by the time its
  model is built (those whose import name is their path below that folder: ``helpers.py`` as ``helpers``,
  ``mylib/model.py`` as ``mylib.model``; where the folder is on ``sys.path``); or a built-in example's name and
  the fedloom version that ships it; a :class:`~fedloom.app.job.Job` made in Python has no source. What the
  data function imports later is not in it: the server never reads a site's data;
- the **model's structure**: each parameter's name, dtype and shape (``init_params``) and, where the task
  describes them (:meth:`fedloom.TorchTask.describe_layers`), its layers, so that a changed activation, which
  keeps every shape, changes the digest;
- the **task's settings** as :func:`~fedloom.app.job.describe` gives them (loss, optimizer, model factory), less
  the device (where a site trains is its own choice), the job's **client mods**, and its **name**.

The strategy is not in it: it runs at the server only, which may run another than the job's (``--strategy``).
The run's record holds the strategy it runs, and a resume under another is refused as it always was; an edit
of the strategy in the job file changes the file's bytes anyway. Paths never enter the digest: a site may keep
the job file anywhere, and two processes that load the same file or example under the same fedloom get the
same digest.

A deployment records its job in its run directory (``job.json``), refuses to resume under another one, naming
what changed (:func:`bind_job`), and announces the digest to each site, which is refused when its own differs.

>>> digest = job_digest(load_job("digits"))                # doctest: +SKIP
>>> digest.sha256                                          # doctest: +SKIP
'sha256:...'
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedloom.app.job import Job, describe
from fedloom.core.checkpoint import write_atomic
from fedloom.core.errors import ConfigError, RunStoreError, user_code
from fedloom.core.params import Params

__all__ = ["JOB_RECORD", "JobDigest", "bind_job", "job_digest", "param_spec"]

#: The file in a deployment's run directory that records the job its run was started with.
JOB_RECORD = "job.json"
_SHOWN_CHANGES = 5  # a message names this many changes, then counts the rest
_SHORT = 12  # hex digits of a file's digest shown in a message
_VALUE_MAX = 80  # characters of a setting's JSON shown in a message


@dataclass(frozen=True)
class JobDigest:
    """What a job's digest covers (``parts``, JSON-like: ``name``, ``source``, ``model``, ``layers``, ``task``,
    ``mods``) and the digest itself (:attr:`sha256`)."""

    parts: Mapping[str, Any]

    @property
    def sha256(self) -> str:
        """``sha256:`` and the hex digest of the parts' canonical JSON (sorted keys, no spaces)."""
        canonical = json.dumps(self.parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()

    def changes(self, before: Mapping[str, Any]) -> list[str]:
        """What changed from the parts ``before`` (another digest's) to these, one phrase each: the job file,
        a module it imports, a parameter's shape, a layer, a task setting..."""
        now = self.parts
        found = [
            *_renamed(before.get("name"), now.get("name")),
            *_source_changes(before.get("source") or {}, now.get("source") or {}),
            *_entry_changes("layer", before.get("layers") or {}, now.get("layers") or {}),
            *_entry_changes("parameter", before.get("model") or {}, now.get("model") or {}),
            *(
                f"the task's {path or 'settings'} is {_shown(new)} now, {_shown(old)} then"
                for path, old, new in _leaves(before.get("task"), now.get("task"))
            ),
        ]
        if before.get("mods") != now.get("mods"):
            found.append(f"the job's client mods are {_shown(now.get('mods'))} now, {_shown(before.get('mods'))} then")
        return found

    def save(self, run_dir: str | Path) -> None:
        """Record the job in ``run_dir`` (``job.json``: its digest and what it covers), atomically; raise
        :class:`RunStoreError` if it cannot be written."""
        text = json.dumps({"digest": self.sha256, "parts": self.parts}, indent=2, sort_keys=True) + "\n"
        try:
            write_atomic(Path(run_dir) / JOB_RECORD, text.encode())
        except OSError as exc:
            raise RunStoreError(f"cannot record the job in {Path(run_dir) / JOB_RECORD}: {exc}") from None


def job_digest(job: Job, params: Params | None = None) -> JobDigest:
    """The digest of ``job``. ``params`` are its model's initial params where the caller has them (any seed:
    only their names, dtypes and shapes count); without them the model is built (``init_params(0)``).

    Raises what building the model raises (as a one-line error naming the job), and :class:`ConfigError` when
    the job file it was loaded from cannot be read any more."""
    if params is None:
        with user_code(f"the model of job {job.name!r} (init_params)"):
            params = job.task.init_params(0)
    describe_layers = getattr(job.task, "describe_layers", None)
    layers: Mapping[str, str] = {}
    if callable(describe_layers):
        with user_code(f"the model of job {job.name!r} (its layers)"):
            layers = describe_layers()
    return JobDigest(
        {
            "name": job.name,
            "source": _source(job),
            "model": {name: param_spec(array) for name, array in params.items()},
            "layers": dict(layers),
            "task": _without_device(describe(job.task)),
            "mods": describe(list(job.mods)),
        }
    )


def param_spec(array: Any) -> str:
    """A parameter's dtype and shape as a message shows it: ``float32[32,64]``."""
    return f"{array.dtype}[{','.join(str(n) for n in array.shape)}]"


def bind_job(run_dir: str | Path, digest: JobDigest) -> None:
    """Bind the run directory ``run_dir`` to ``digest``'s job: record it there (:meth:`JobDigest.save`) if no job
    is recorded yet, and raise :class:`ConfigError` if another one is, naming what changed and how to run the
    changed job (a new run directory, starting from this run's model where it fits). :class:`RunStoreError`
    when the record cannot be read or written."""
    path = Path(run_dir) / JOB_RECORD
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        then, parts = str(recorded["digest"]), recorded["parts"]
    except FileNotFoundError:
        digest.save(run_dir)
        return
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunStoreError(f"cannot read the job recorded in {path}: {exc}") from None
    if then == digest.sha256:
        return
    changes = digest.changes(parts if isinstance(parts, Mapping) else {}) or ["its digest differs"]
    shown = "; ".join(changes[:_SHOWN_CHANGES])
    if len(changes) > _SHOWN_CHANGES:
        shown += f"; and {len(changes) - _SHOWN_CHANGES} more"
    raise ConfigError(
        f"the run in {run_dir} was started with another job ({then} then, {digest.sha256} now): {shown}. "
        f"A run goes on only with its own job: to run the changed one, give a new --run-dir (with "
        f"--from-checkpoint {run_dir} to start from this run's model, where its parameters still fit)"
    )


def _source(job: Job) -> dict[str, Any]:
    """Where the job comes from, by content: a job file's digest and those of the modules it imports from its
    folder; a built-in example's name and fedloom's version; nothing for a job made in Python."""
    source = job.source
    if source is None:
        return {}
    path = Path(source)
    if not path.is_absolute():  # load_job gives a job file's absolute path, an example's name
        from fedloom import __version__

        return {"example": source, "fedloom": __version__}
    try:
        file = _file_sha256(path)
    except OSError as exc:
        raise ConfigError(f"cannot read the job file {path}: {exc.strerror or exc}") from None
    return {"file": file, "imports": _local_imports(path)}


def _local_imports(job_file: Path) -> dict[str, str]:
    """The digests of the modules loaded from ``job_file``'s folder under the import name that is their path
    below it (``helpers.py`` as ``helpers``, ``mylib/__init__.py`` as ``mylib``), by that path. A package
    installed below the folder (a virtual environment in it) is imported under another name, so it is not
    among them."""
    own = job_file.resolve()
    folder = own.parent
    prefix = str(folder)
    found: dict[str, str] = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not isinstance(file, str) or not file.startswith(prefix) or not file.endswith(".py"):
            continue
        path = Path(file).resolve()
        try:
            relative = path.relative_to(folder)
        except ValueError:
            continue
        parts = relative.with_suffix("").parts
        dotted = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if dotted == name and path != own:
            try:
                found[relative.as_posix()] = _file_sha256(path)
            except OSError:
                continue  # gone since it was imported: what ran is in memory, not on disk
    return dict(sorted(found.items()))


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _without_device(described: Any) -> Any:
    """A task's description without its ``device`` settings: where a site trains is its own choice."""
    if isinstance(described, dict):
        return {k: _without_device(v) for k, v in described.items() if k != "device"}
    if isinstance(described, list):
        return [_without_device(v) for v in described]
    return described


def _renamed(old: Any, new: Any) -> list[str]:
    return [] if old == new else [f"the job's name is {_shown(new)} now, {_shown(old)} then"]


def _source_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    if "file" in old and "file" in new:
        found = []
        if old["file"] != new["file"]:
            found.append(f"the job file changed (sha256 {_short(old['file'])} then, {_short(new['file'])} now)")
        before, after = old.get("imports") or {}, new.get("imports") or {}
        for module in sorted(before.keys() | after.keys()):
            if module not in after:
                found.append(f"the job file no longer imports {module} from its folder")
            elif module not in before:
                found.append(f"the job file imports {module} from its folder now")
            elif before[module] != after[module]:
                found.append(
                    f"{module}, which the job file imports, changed "
                    f"(sha256 {_short(before[module])} then, {_short(after[module])} now)"
                )
        return found
    if "example" in old and "example" in new:
        found = [] if old["example"] == new["example"] else [f"the example is {new['example']} now"]
        if old.get("fedloom") != new.get("fedloom"):
            found.append(
                f"fedloom is version {new.get('fedloom')} now, {old.get('fedloom')} then (a built-in job is "
                "the version's own)"
            )
        return found
    if old != new:
        return [f"the job is {_source_text(new)} now, {_source_text(old)} then"]
    return []


def _source_text(source: Mapping[str, Any]) -> str:
    if "file" in source:
        return "a job file"
    if "example" in source:
        return f"the built-in example {source['example']} of fedloom {source.get('fedloom')}"
    return "a Job made in Python"


def _entry_changes(what: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Each parameter (or layer) added, removed or changed, in the order of the new model, then the removed."""
    found = []
    for name, value in new.items():
        if name not in old:
            found.append(f"the model has the {what} {name} ({value}) now, which it had not")
        elif old[name] != value:
            found.append(f"the model's {what} {name} is {value} now, {old[name]} then")
    found.extend(f"the model has no {what} {name} now ({old[name]} then)" for name in old if name not in new)
    return found


def _leaves(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Where two JSON descriptions differ, as (dotted path, old value, new value), down to the deepest part."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            found
            for key in sorted(old.keys() | new.keys())
            for found in _leaves(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        ]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [found for i, (a, b) in enumerate(zip(old, new, strict=True)) for found in _leaves(a, b, f"{path}[{i}]")]
    return [] if old == new else [(path, old, new)]


def _shown(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= _VALUE_MAX else text[: _VALUE_MAX - 1] + "…"


def _short(hexdigest: Any) -> str:
    return f"{str(hexdigest)[:_SHORT]}…"
