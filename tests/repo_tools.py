"""The repository root and its ``tools/`` scripts, for tests that run them in-process.

A plain module (not conftest.py): several test folders have a conftest, so
``from conftest import ...`` would pick whichever was imported first.
"""

import importlib.util
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name):
    """Import ``tools/<name>.py`` as a module (tools are scripts, not a package)."""
    path = os.path.join(REPO_ROOT, "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
