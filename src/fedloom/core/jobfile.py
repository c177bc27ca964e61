"""Importing a job file as a module, the same way in the main process and in worker processes."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType

from fedloom.core.errors import FedloomError, JobError

__all__ = ["import_job_file"]


def import_job_file(path: Path) -> ModuleType:
    """Import the job file at ``path`` as a module; any failure is a one-line :class:`JobError`.

    The module's name is derived from the file's absolute path, the same in every process (str hashes are
    salted per process), so that a worker process that imports the same file gets the same module and can
    unpickle the job's functions.
    """
    name = f"fedloom_job_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}"
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
