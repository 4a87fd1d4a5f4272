"""Publish a converter's output directory whole or not at all.

Everything is written to a temporary sibling directory (same filesystem, so
the final rename is atomic); only when it is complete is it renamed to the
target. An existing non-empty target is refused unless forced, and when
forced it is swapped out only after the new one is complete, so an
interrupted conversion never leaves a half-written target nor loses the old.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from patch_megatron.conversion.errors import ConversionError


def check_target(target: str, force: bool) -> None:
    """Refuse a non-empty target before any work is done (unless ``force``)."""
    if os.path.isfile(target):
        raise ConversionError(f"output {target} is a file, not a directory: choose another path")
    if os.path.isdir(target) and os.listdir(target) and not force:
        raise ConversionError(f"output directory {target} is not empty: choose an empty or new "
                              "directory, or pass --force to replace it")


@contextlib.contextmanager
def publish_directory(target: str, force: bool = False):
    """Yield a temporary directory; on success it becomes ``target``."""
    check_target(target, force)
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.partial-", dir=parent)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if os.path.exists(target):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
        os.rmdir(old)
        os.rename(target, old)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
