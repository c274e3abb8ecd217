"""Package faces that import their modules on first use.

Why: ``import clam_heat.models`` (or ``tissue``, ``explain``) should not import torch, OpenCV
or Captum before a name that needs them is used, so a command that never draws a map or runs a
model stays light (docs/performance.md). A package lists ``name -> submodule`` once and gets
its ``__getattr__`` and ``__dir__`` from :func:`lazy_exports`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, str], namespace: MutableMapping[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: a name of ``exports`` is imported from its
    submodule when first asked for and then kept in ``namespace`` (the package's globals).

    >>> ns: dict[str, Any] = {}
    >>> getattr_, dir_ = lazy_exports("json", {"JSONEncoder": "encoder"}, ns)
    >>> getattr_("JSONEncoder")().encode([1])
    '[1]'
    >>> "JSONEncoder" in ns, dir_()
    (True, ['JSONEncoder'])
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
