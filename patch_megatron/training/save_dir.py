"""Guards on --save, checked before the first step: nothing already written is lost.

- ``--save`` must be a directory this run can write, with room for one
  checkpoint (estimated from the parameter count and the optimizer state).
- One run at a time per ``--save``: rank 0 holds an exclusive ``flock`` on
  ``SAVE/.lock`` for the whole run; a second run is refused, not left to
  collide with the first's renames.
- A run that did not load a checkpoint (from scratch: ``--load`` absent, or
  naming a directory without one) would write its iterations over another
  run's checkpoints and move their ``latest`` back: refused unless
  ``--overwrite-save`` (this project's flag, not Megatron-LM's) says so.

Rank 0 decides; every rank learns the verdict, so all of them stop together.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket

import torch

LOCK_FILE = ".lock"


class SaveDirError(RuntimeError):
    """--save cannot take this run's checkpoints; the message says why and what to do."""


def holds_checkpoints(save: str) -> bool:
    from patch_megatron.training.checkpointing import INCOMPLETE_SUFFIX, LATEST_FILE

    if not os.path.isdir(save):
        return False
    return any(name == LATEST_FILE or (name.startswith("iter_") and not name.endswith(INCOMPLETE_SUFFIX))
               for name in os.listdir(save))


def check_writable(save: str) -> None:
    """--save is (or can be made) a directory that accepts a file."""
    if os.path.exists(save) and not os.path.isdir(save):
        raise SaveDirError(f"--save {save} is a file, not a directory: pass a directory path")
    try:
        os.makedirs(save, exist_ok=True)
        probe = os.path.join(save, f".write-probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("probe")
        os.remove(probe)
    except OSError as error:
        raise SaveDirError(f"--save {save} is not writable ({error.strerror}): choose a directory "
                           "this run can write, or fix its permissions") from None


def checkpoint_bytes(model: list, args) -> int:
    """About one checkpoint's size: weights at their dtype, fp32 master copies, two Adam moments.

    Collective: every rank counts its parameters; data-parallel replicas hold the same ones.
    """
    from megatron.core import parallel_state

    parameters = [p for chunk in model for p in chunk.module.parameters()]
    count = torch.tensor([float(sum(p.numel() for p in parameters))])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        count = count.to(parameters[0].device)
        torch.distributed.all_reduce(count)
        count = count.cpu() / parallel_state.get_data_parallel_world_size()
    half = args.bf16 or args.fp16
    per_parameter = (2 + 4 if half else 4) + 8  # weights (+ fp32 master) + exp_avg, exp_avg_sq
    # Measured: a small model's torch_dist checkpoint is ~10% above this count (metadata, RNG
    # state, the schedule); the margin covers that.
    return int(count.item() * per_parameter * 1.1) + (1 << 19)


def check_space(save: str, needed: int) -> None:
    free = shutil.disk_usage(save).free
    if free < needed:
        raise SaveDirError(f"--save {save} has {_size(free)} free but one checkpoint needs about "
                           f"{_size(needed)}: free space there or choose another --save")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class SaveLock:
    """An exclusive flock on SAVE/.lock, held while this process lives (or until ``release``)."""

    def __init__(self, save: str):
        import fcntl

        self.path = os.path.join(save, LOCK_FILE)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise SaveDirError(f"--save {save}: cannot lock {self.path} ({error.strerror}): "
                                   "choose a --save on a filesystem with file locks") from None
            raise SaveDirError(f"--save {save} is in use by another run ({holder} holds "
                               f"{self.path}): wait for it to end, or choose another --save") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def refuse_overwrite(save: str, args) -> None:
    if args.overwrite_save or not holds_checkpoints(save):
        return
    reason = f"--load {args.load} holds no checkpoint" if args.load else "no --load was given"
    raise SaveDirError(
        f"--save {save} already holds checkpoints, and this run starts from scratch ({reason}): "
        f"pass --load {save} to resume them, choose another --save, or pass --overwrite-save to "
        "start over there (its iterations then replace the old ones)")


def prepare(args, needed: int, loaded: bool) -> SaveLock | None:
    """Run every guard; returns rank 0's lock (None elsewhere). Raises SaveDirError on all ranks.

    ``needed``: checkpoint_bytes(), counted on every rank beforehand.
    """
    save = args.save
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    lock, verdict = None, None
    if rank == 0:
        try:
            check_writable(save)
            if not loaded:  # before the lock file is made: another run's folder is left as it was
                refuse_overwrite(save, args)
            lock = SaveLock(save)
            check_space(save, needed)
        except SaveDirError as error:
            verdict = str(error)
            if lock is not None:
                lock.release()
                lock = None
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        shared = [verdict]
        torch.distributed.broadcast_object_list(shared, src=0)
        verdict = shared[0]
    if verdict is not None:
        raise SaveDirError(verdict)
    return lock


def _says_no_space(error: BaseException) -> bool:
    seen, cause = set(), error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def no_space_message(error: BaseException, save: str, needed: int,
                     last_good: int | None) -> str | None:
    """The one-line message for a save that ran out of disk, or None if ``error`` is another.

    dist_checkpointing's writer workers do not always say ENOSPC (a short write surfaces as
    torch's "unexpected pos" from its zip writer): a failed save with less than one
    checkpoint's room left counts as a full disk too.
    """
    try:
        full = shutil.disk_usage(save).free < needed
    except OSError:
        full = False
    if not (full or _says_no_space(error)):
        return None
    kept = (f"the last good checkpoint (iteration {last_good}) stays latest" if last_good
            else "no checkpoint of this run was completed")
    return (f"no space left on device while saving to --save {save}: {kept}; free space there "
            f"and resume with --load {save}")
