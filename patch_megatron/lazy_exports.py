"""Package exports imported on first use (PEP 562).

Several subpackages' modules import megatron-core, which takes seconds and warns
about its fallbacks; the flag parser and the tools' argument checks must not pay
for it. Such a package names where each export lives and gets its names from here.
"""

from __future__ import annotations

import importlib


def exports(package: str, homes: dict[str, str]):
    """A module ``__getattr__`` that imports ``package.homes[name]`` when ``name`` is first used."""

    def __getattr__(name):
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{homes[name]}"), name)

    return __getattr__
