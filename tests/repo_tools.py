"""The repository root and its ``tools/`` scripts, for tests that run them in-process.

A plain module (not conftest.py): several test folders have a conftest, so
``from conftest import ...`` would pick whichever was imported first.
"""

import importlib.util
import os

from patch_megatron.parallel import free_port  # noqa: F401  (the tests' one too)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name):
    """Import ``tools/<name>.py`` as a module (tools are scripts, not a package)."""
    return load_module(os.path.join(REPO_ROOT, "tools", f"{name}.py"), f"tool_{name}")


def load_module(path, name=None):
    """Import a script of the repository (a tool, an example) as a module."""
    name = name or os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child_environment(**extra):
    """The environment for a training or tool subprocess: one thread, no warnings, and a
    rendezvous port of its own. The port is always fresh because a one-process world set up
    in the test process (conversion tests) leaves its MASTER_PORT in os.environ, in use."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MASTER_PORT=str(free_port()))
    env.update(extra)
    return env


# Training runs in tests read batches in the training process: each run's reader processes
# (--num-workers, default 2 as in Megatron-LM) start a fresh interpreter that imports torch,
# about a second of CPU per process, and the suite launches a few hundred. The reader processes
# themselves are tested where they matter: tests/training/test_loop.py compares 2 workers with
# 0, and the kill and signal tests in tests/test_pretrain_patch_gpt.py keep the default.
IN_PROCESS_READING = ("--num-workers", "0")
