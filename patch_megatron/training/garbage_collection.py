"""``--manual-gc``: Python's garbage collector runs at chosen points, the same on every rank.

As in Megatron-LM: the threshold-based collector is off for the stage (a collection on one
rank stalls the collectives the others wait in), one full collection runs at the start,
one every ``--manual-gc-interval`` iterations (0: never), and, unless
``--no-manual-gc-eval``, a full one before each evaluation of the loop and a young-generation
one after it (the evaluation's own garbage). The collector is turned back on when the stage
ends, since the process may go on (a tool, a test).
"""

from __future__ import annotations

import contextlib
import gc


class ManualGC:
    def __init__(self, args):
        self.enabled = args.manual_gc
        self.interval = args.manual_gc_interval
        self.around_eval = args.manual_gc_eval

    def after_step(self, iteration: int) -> None:
        if self.enabled and self.interval and iteration % self.interval == 0:
            gc.collect()

    @contextlib.contextmanager
    def evaluation(self):
        if self.enabled and self.around_eval:
            gc.collect()
        yield
        if self.enabled and self.around_eval:
            gc.collect(generation=0)


@contextlib.contextmanager
def manual_gc(args):
    """The stage's collector control; with --manual-gc, automatic collection is off inside."""
    control = ManualGC(args)
    was_enabled = gc.isenabled()
    if control.enabled:
        gc.disable()
        gc.collect()
    try:
        yield control
    finally:
        if control.enabled and was_enabled:
            gc.enable()
