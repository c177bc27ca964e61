"""Importing a job file as a module, the same way in the main process and in worker processes."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType

from fedloom.core.errors import FedloomError, JobError

__all__ = ["JOB_MODULE_PREFIX", "import_job_file", "is_job_module"]

#: How the module of a job file is named (then 16 hex digits of its path's hash): see :func:`import_job_file`.
JOB_MODULE_PREFIX = "fedloom_job_"


def import_job_file(path: Path) -> ModuleType:
    """Import the job file at ``path`` as a module; any failure is a one-line :class:`JobError`.

    The module's name is derived from the file's absolute path, the same in every process (str hashes are
    salted per process), so that a worker process that imports the same file gets the same module and can
    unpickle the job's functions.
    """
    name = f"{JOB_MODULE_PREFIX}{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise JobError(f"cannot load job file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except FedloomError as exc:
        raise JobError(f"job file {path}: {exc}") from exc
    except Exception as exc:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path.resolve()]
        line = f" (line {frames[-1].lineno})" if frames else ""
        raise JobError(f"job file {path} raised {type(exc).__name__}{line}: {exc}") from exc
    return module


def is_job_module(name: str) -> bool:
    """Whether ``name`` is the name :func:`import_job_file` gives a job file's module (derived from its path)."""
    return name.startswith(JOB_MODULE_PREFIX)
