"""Import every module of a package so its ``@register`` decorators run.

New models, tasks and CLI commands are picked up by adding a file; no central list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def import_submodules(package: ModuleType) -> list[ModuleType]:
    modules = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            modules.append(importlib.import_module(f"{package.__name__}.{info.name}"))
    return modules
