"""fedloom.core stands on its own: every module imports alone, imports nothing above core, and the modules of
core import one another without a cycle (and never through the package's ``__init__``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import fedloom.core

pytestmark = pytest.mark.integration  # a fresh interpreter per module

CORE = Path(fedloom.core.__file__).parent
MODULES = sorted(path.stem for path in CORE.glob("*.py") if path.stem != "__init__")

# Imports fedloom.core.<name> in a fresh interpreter where ``fedloom`` and ``fedloom.core`` are empty packages:
# only that module and what it imports itself are loaded, so a module that leans on something another one (or
# the package's __init__) loaded first fails here, and so does one that reaches above core.
_ALONE = """
import importlib, sys, types
for name, path in (("fedloom", {top!r}), ("fedloom.core", {core!r})):
    package = types.ModuleType(name)
    package.__path__ = [path]
    sys.modules[name] = package
importlib.import_module("fedloom.core." + {module!r})
print("\\n".join(sorted(m for m in sys.modules if m.startswith("fedloom.") and not m.startswith("fedloom.core."))))
"""


@pytest.mark.parametrize("module", MODULES)
def test_each_core_module_imports_alone_and_nothing_above_core(module: str) -> None:
    code = _ALONE.format(top=str(CORE.parent), core=str(CORE), module=module)
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["fedloom.core"]


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, at any depth (in functions too), but those under ``if TYPE_CHECKING``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def core_imports(module: str) -> set[str]:
    """The core modules ``module`` imports, by name. Fails on ``from fedloom.core import ...``: a core module
    names the module it imports (``from fedloom.core.params import Params``), never the package, whose
    ``__init__`` imports every core module back."""
    imported = set()
    for node in _runtime_imports(ast.parse((CORE / f"{module}.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            assert node.module != "fedloom.core", f"fedloom.core.{module} imports through the package fedloom.core"
            names = [node.module or ""]
        else:
            names = [alias.name for alias in node.names]
        imported.update(name.split(".")[2] for name in names if name.startswith("fedloom.core."))
    return imported - {module}


def test_core_modules_import_one_another_without_a_cycle() -> None:
    graph = {module: core_imports(module) for module in MODULES}
    done: set[str] = set()

    def walk(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            pytest.fail("an import cycle in fedloom.core: " + " -> ".join(cycle))
        if module in done:
            return
        for imported in sorted(graph[module]):
            walk(imported, [*path, module])
        done.add(module)

    for module in MODULES:
        walk(module, [])
    assert graph["params"] == {"errors", "wireformat"}  # what Params.sha256 hashes, without the codec
