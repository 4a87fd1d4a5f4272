"""When to stop early: SIGTERM (--exit-signal-handler), --exit-duration-in-mins, --exit-interval."""

from __future__ import annotations

import signal
import time

import torch

from patch_megatron import parallel


class ExitConditions:
    """Decides, the same way on every rank, whether to save and stop after this iteration."""

    def __init__(self, args):
        self.exit_interval = args.exit_interval
        self.duration_s = None if args.exit_duration_in_mins is None else 60 * args.exit_duration_in_mins
        self.start = time.monotonic()
        self.signal_received = False
        self.handles_signal = args.exit_signal_handler
        if self.handles_signal:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        # Only a flag: the iteration finishes, then every rank saves together.
        self.signal_received = True

    def reason(self, iteration: int) -> str | None:
        if self.exit_interval and iteration % self.exit_interval == 0:
            return f"--exit-interval {self.exit_interval} reached"
        if not self.handles_signal and self.duration_s is None:
            return None
        # One rank may get the signal or pass the time limit first: agree across ranks.
        local = torch.tensor([
            float(self.signal_received),
            float(self.duration_s is not None and time.monotonic() - self.start > self.duration_s),
        ], device=parallel.device())
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX)
        if local[0]:
            return "SIGTERM received"
        if local[1]:
            return f"--exit-duration-in-mins {self.duration_s / 60:g} passed"
        return None
