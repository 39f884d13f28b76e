"""Lazy package attributes: a package's public names load their module on first access (PEP 562), so importing the
package stays cheap and no module is imported before it is needed."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package`` that imports ``names[name]`` (a module path) on first access.

    Raises:
        AttributeError: for a name that is not in ``names``, naming the package.
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
