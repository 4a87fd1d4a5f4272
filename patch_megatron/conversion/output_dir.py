"""Publish a converter's output directory whole or not at all.

Everything is written to a temporary sibling directory (same filesystem, so
the final rename is atomic); only when it is complete is it renamed to the
target. An existing non-empty target is refused unless forced, and when
forced it is swapped out only after the new one is complete, so an
interrupted conversion never leaves a half-written target nor loses the old.
What is published gets the usual permissions (0777/0666 less the umask), not
the private 0700/0600 of temporary names.

An output that is, contains or lies inside the converter's input is refused,
``--force`` or not: replacing it would delete the checkpoints being read.
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


def refuse_overlap(source: str, source_flag: str, target: str, target_flag: str) -> None:
    """Refuse a target that is, contains or lies inside ``source`` (symlinks resolved)."""
    real_source, real_target = os.path.realpath(source), os.path.realpath(target)
    if real_target == real_source:
        relation = "is"
    elif real_target.startswith(real_source.rstrip(os.sep) + os.sep):
        relation = "lies inside"
    elif real_source.startswith(real_target.rstrip(os.sep) + os.sep):
        relation = "contains"
    else:
        return
    raise ConversionError(f"{target_flag} {target} {relation} the input {source_flag} {source}; "
                          "writing it would delete what is being converted (even with --force): "
                          f"choose a {target_flag} outside {source}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _give_usual_permissions(root: str) -> None:
    """tempfile's 0700 directories and 0600 files become what open()/mkdir would have made."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


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
    _give_usual_permissions(staging)
    old = None
    if os.path.exists(target):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
        os.rmdir(old)
        os.rename(target, old)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
