"""pyproject.toml lists fedloom's packages by hand (examples/ is mapped to fedloom.examples); keep it complete."""

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_source_package_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT / "src").parts)
        for init in (ROOT / "src" / "fedloom").rglob("__init__.py")
    }
    found.add("fedloom.examples")
    assert found == listed


def test_builtin_examples_are_the_repository_examples():
    from fedloom.app.job import builtin_examples

    files = {p.stem for p in (ROOT / "examples").glob("*.py") if not p.stem.startswith("_")}
    assert set(builtin_examples()) == files
    assert {"digits", "heart_disease", "mnist", "synthetic"} <= files
