"""Megatron-LM's ``--profile``: a capture range of steps for nsys, or torch.profiler traces.

Without ``--use-pytorch-profiler`` the steps from ``--profile-step-start`` to
``--profile-step-end`` are bracketed by ``cudaProfilerStart/Stop`` and NVTX
ranges, for ``nsys profile --capture-range=cudaProfilerApi``; with it,
torch.profiler records those steps and writes a TensorBoard trace into
``--tensorboard-dir``. Only the ranks of ``--profile-ranks`` profile. As in
Megatron-LM, the step numbers count iterations done before the step, from the
start of this stage.
"""

from __future__ import annotations

import torch


class Profiler:
    def __init__(self, args, rank: int, print_fn=print):
        self.enabled = bool(args.profile) and rank in args.profile_ranks
        self.start, self.end = args.profile_step_start, args.profile_step_end
        self.torch_profiler = None
        self.nvtx = None
        self.cuda = torch.cuda.is_available()
        if self.enabled and args.use_pytorch_profiler:
            self.torch_profiler = torch.profiler.profile(
                schedule=torch.profiler.schedule(wait=max(self.start - 1, 0),
                                                 warmup=1 if self.start > 0 else 0,
                                                 active=self.end - self.start, repeat=1),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(args.tensorboard_dir),
                record_shapes=True, with_stack=True)
            self.torch_profiler.start()
        elif self.enabled and not self.cuda:
            print_fn("> --profile: no GPU, so no CUDA capture range for nsys "
                     "(--use-pytorch-profiler traces on CPU too)")

    def before_step(self, iteration: int) -> None:
        if not self.enabled:
            return
        if self.torch_profiler is not None:
            self.torch_profiler.step()
        elif iteration == self.start and self.cuda:
            torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStart())
            self.nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=True)
            self.nvtx.__enter__()

    def after_step(self, iteration: int) -> None:
        if not self.enabled or iteration != self.end:
            return
        if self.torch_profiler is not None:
            self.torch_profiler.stop()
            self.torch_profiler = None
        elif self.cuda:
            torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStop())
            if self.nvtx is not None:
                self.nvtx.__exit__(None, None, None)
                self.nvtx = None
