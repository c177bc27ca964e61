"""Public names imported on first use: how fedloom's packages keep ``import fedloom`` (and the command line's
start-up) from loading numpy, torch or gRPC before a name that needs them is asked for."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, homes: Mapping[str, str], names: Sequence[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` (its ``__name__``, while its ``__init__`` runs): a name in
    ``homes`` is imported from its home module the first time it is asked for and kept on the package, so the next
    lookup is an ordinary attribute. A home is a module's full name (``fedloom.core.checkpoint``) or a name inside
    the package (``codec``). ``__dir__`` lists what the package holds and its public ``names``."""
    module = sys.modules[package]

    def lookup(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        where = home if home.startswith("fedloom.") else f"{package}.{home}"
        value = getattr(importlib.import_module(where), name)
        setattr(module, name, value)
        return value

    def listing() -> list[str]:
        return sorted({*vars(module), *names})

    return lookup, listing
