"""Child processes die with the run: no orphaned checkpoint writers after a SIGKILL.

megatron-core's dist_checkpointing starts helpers that outlive a killed run
unless told otherwise: a multiprocessing ``Manager`` (a spawned Python that
imports the run's main module, ~270 MB) for its write-results queue, forked
writer processes during each save, and multiprocessing's resource tracker.
Linux's ``PR_SET_PDEATHSIG`` makes the kernel send a child SIGKILL when its
parent dies; it is set in every forked child (``os.register_at_fork``) and,
for spawned children, when they import the main module
(``die_with_parent_if_spawned``). The resource tracker then sees its last
client gone and exits by itself.

The signal follows the thread that forked: megatron's synchronous save forks
from the calling (main) thread, which lives as long as the run.
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h
_installed = False
_forking_pid = [0]


_prctl = []  # libc's prctl, looked up before any fork: a forked child must not import or dlopen


def _libc_prctl():
    if not _prctl:
        import ctypes

        _prctl.append(ctypes.CDLL(None, use_errno=True).prctl)
    return _prctl[0]


def die_with_parent(parent_pid: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    # In a child forked from a threaded parent only this thread runs: an import or dlopen
    # here could wait forever on a lock another parent thread held at the fork (seen in CI).
    _libc_prctl()(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The parent may have died before the request: then nobody will send the signal.
    if (parent_pid is not None and os.getppid() != parent_pid) or os.getppid() == 1:
        os._exit(1)


def install() -> None:
    """In the run's process: every child forked from now on dies with its parent."""
    global _installed
    if _installed or not hasattr(os, "register_at_fork"):
        return
    _installed = True
    if sys.platform.startswith("linux"):
        _libc_prctl()  # resolved now, in the parent
    os.register_at_fork(before=lambda: _forking_pid.__setitem__(0, os.getpid()),
                        after_in_child=lambda: die_with_parent(_forking_pid[0]))


def die_with_parent_if_spawned(module_name: str) -> None:
    """Called at the top of a main script: in a multiprocessing spawn child (which imports the
    script as ``__mp_main__``), die with the parent too."""
    if module_name == "__mp_main__":
        die_with_parent()
        install()
