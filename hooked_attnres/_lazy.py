"""A package's names imported on first use (PEP 562), the one loader of the lazy packages.

``hooked_attnres`` (so that ``import hooked_attnres`` and the command line's ``--help`` load
no torch) and ``hooked_attnres.study`` (so that ``hooked-attnres list`` and the reading of a
condition name load no torch, audit 198) each hold a table of their names and the modules
that define them, and a ``TYPE_CHECKING`` block importing them for type checkers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(
    package: str, where: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``, whose names ``where``
    maps to the modules that define them: a name is imported from its module on first use
    and kept in ``namespace`` (the package's ``globals()``, so that later lookups skip
    ``__getattr__``); ``dir()`` lists every name before it is loaded (tab completion); any
    other name raises ``AttributeError`` in Python's words."""

    def __getattr__(name: str) -> Any:
        if name in where:
            value = getattr(importlib.import_module(where[name]), name)
            namespace[name] = value  # later lookups skip this function
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*namespace, *where})

    return __getattr__, __dir__
