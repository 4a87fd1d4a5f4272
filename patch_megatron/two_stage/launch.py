"""Running a two-stage plan's remaining steps: one process (or torch.distributed.run) per
step, a SIGTERM passed on to the running stage, other nodes waiting for rank 0's handoff."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time

from patch_megatron.training.checkpointing import CheckpointError, read_latest_iteration
from patch_megatron.two_stage.plan import Launch, TwoStageError
from patch_megatron.two_stage.progress import Step, saved_iteration

# How long nodes other than rank 0 wait for the handoff (converting a few
# billion parameters on one CPU process takes minutes, not hours).
HANDOFF_WAIT_SECONDS = 2 * 3600


POLL_SECONDS = 10


class StageStopped(RuntimeError):
    """A stage process failed or stopped before its planned iteration."""


def _process_environment(command: list[str], environ) -> dict:
    """A process started without torch.distributed.run is a world of one: give it a free local
    port, so that it never collides with another job's default port (or the launch's)."""
    if "torch.distributed.run" in command:
        return dict(environ)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {**environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _run_process(command: list[str], environ) -> int:
    """Run a stage; a SIGTERM to the runner goes on to it (it saves with --exit-signal-handler)."""
    process = subprocess.Popen(command, env=_process_environment(command, environ))
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum))
    try:
        return process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_for_checkpoint(save_dir: str, iteration: int, timeout_s: float,
                        poll_s: float = POLL_SECONDS) -> bool:
    """Wait until ``save_dir``'s latest checkpoint is ``iteration`` (another node writes it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if read_latest_iteration(save_dir) == iteration:
                return True
        except CheckpointError:
            pass  # being written
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def run_steps(steps: list[Step], launch: Launch, print_fn=print, environ=os.environ,
              handoff_wait_s: float = HANDOFF_WAIT_SECONDS) -> None:
    """Run what is not done yet, in order; raises StageStopped or TwoStageError."""
    for number, step in enumerate(steps, 1):
        title = f"[{number}/{len(steps)}] {step.name}"
        if step.action == "skip":
            print_fn(f"{title}: skipped, {step.note}")
            continue
        save_dir = step.command[step.command.index("--save") + 1]
        if step.action == "wait":
            print_fn(f"{title}: {step.note}")
            if not wait_for_checkpoint(save_dir, 0, handoff_wait_s):
                raise TwoStageError(f"{save_dir} did not appear within {handoff_wait_s / 60:.0f} "
                                    "minutes: check node rank 0's output, and that --save is on a "
                                    "filesystem all nodes share")
            continue
        print_fn(f"{title}: {step.action} ({step.note})\n    {shlex.join(step.command)}")
        started = time.monotonic()
        code = _run_process(step.command, environ)
        if code != 0:
            raise StageStopped(f"{step.name} failed (exit code {code}). Fix the cause and run the "
                               "same command again: finished steps are skipped and an interrupted "
                               "stage resumes from its last checkpoint")
        expected = step.expected_iteration if step.expected_iteration is not None else 0
        # Other nodes may see the shared filesystem's latest file a little later.
        settle_s = 60 if launch.node_rank else 0
        if not wait_for_checkpoint(save_dir, expected, settle_s, poll_s=5):
            found = saved_iteration(save_dir)
            raise StageStopped(f"{step.name} ended at iteration {found}, before its planned "
                               f"{expected} (an exit condition: --exit-interval, "
                               "--exit-duration-in-mins or a signal). Run the same command again "
                               "to continue it")
        print_fn(f"{title}: done in {time.monotonic() - started:.1f} s")
