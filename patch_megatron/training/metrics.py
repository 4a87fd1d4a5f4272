"""What a log line reports: throughput, TFLOP/s, MFU, peak memory; the console line; TensorBoard."""

from __future__ import annotations

import resource
import sys
import time
from datetime import datetime

import torch

from patch_megatron import flops

MIB = 2**20


def mfu_peak_tflops(args, on_cpu: bool) -> float | None:
    """The per-device peak for MFU: --peak-tflops, else a known GPU's bf16/fp16 peak, else none.

    The known peaks are tensor-core bf16/fp16 figures, so an fp32 run on a GPU gets no MFU
    rather than one measured against a peak its matmuls cannot reach.
    """
    if args.peak_tflops is not None:
        return args.peak_tflops
    if on_cpu or not torch.cuda.is_available() or not (args.bf16 or args.fp16):
        return None
    return flops.peak_tflops_of_gpu(torch.cuda.get_device_name())


def step_flops(plan, shape, kept: flops.KeptFractions = flops.FULL_MODEL,
               global_batch_size: int | None = None) -> float:
    """Training FLOPs of one optimizer step of this stage over ``global_batch_size`` samples
    (default: the stage's; a ramp's steps are smaller): the figure behind the logged TFLOP/s
    and MFU (``patch_megatron.flops``, the planner's count too)."""
    batch = plan.global_batch_size if global_batch_size is None else global_batch_size
    return flops.training_flops_per_iteration(shape, plan.seq_length, batch, plan.patch_size, kept)


class IntervalMeter:
    """Wall time and steps since the last log line."""

    def __init__(self):
        self.start = time.monotonic()
        self.iterations = 0

    def add(self, iterations=1):
        self.iterations += iterations

    def take(self) -> tuple[float, int]:
        now = time.monotonic()
        elapsed, n = now - self.start, self.iterations
        self.start, self.iterations = now, 0
        return elapsed, n


def throughput(plan, shape, seconds_per_iter: float, world_size: int, peak_tflops: float | None,
               flops_of_step: float | None = None, tokens_of_step: float | None = None):
    """tokens/s, TFLOP/s per device and MFU (None without a known peak) of one step's timing.

    ``flops_of_step`` is the FLOPs one step really ran (EST's subnetworks, a ramp's smaller
    batches), ``tokens_of_step`` its tokens; None: the full model's over the stage's batch.
    """
    if flops_of_step is None:
        flops_of_step = step_flops(plan, shape)
    if tokens_of_step is None:
        tokens_of_step = plan.tokens_per_step
    tflops = flops_of_step / seconds_per_iter / world_size / 1e12
    mfu = tflops / peak_tflops if peak_tflops else None
    return tokens_of_step / seconds_per_iter, tflops, mfu


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers the steps it claims to."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (getrusage; kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_memory_mib(device: torch.device) -> dict[str, float]:
    """This process's peak memory so far in MiB, keyed by the log label that says what it is.

    GPU: the caching allocator's peaks, as Megatron-LM reports them: the most memory held by
    tensors at once (allocated) and the most the allocator took from the device (reserved).
    CPU: the peak resident set size of the whole process: tensors plus the Python heap and
    the loaded libraries (torch, megatron-core), so it never falls below their footprint.
    """
    if device.type == "cuda":
        return {
            "peak allocated GPU memory (MiB)": torch.cuda.max_memory_allocated(device) / MIB,
            "peak reserved GPU memory (MiB)": torch.cuda.max_memory_reserved(device) / MIB,
        }
    return {"peak RSS of the process (MiB)": peak_rss_bytes() / MIB}


def max_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value's maximum over all ranks (every rank must call this): the rank that peaks
    highest (the first pipeline stage's activations, or the last one's logits) sets the limit."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return dict(values)
    reduced = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX)
    return dict(zip(values, reduced.tolist()))


def params_norm(model) -> float:
    """The L2 norm of the model's parameters, each counted once (Megatron-LM's --log-params-norm):
    tensor-parallel copies and the tied output layer's copy of the embedding are left out, and
    the squares are summed over the tensor- and pipeline-parallel ranks."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    device = next(model.parameters()).device
    total = torch.zeros(1, dtype=torch.float64, device=device)
    for param in model.parameters():
        if param_is_not_tensor_parallel_duplicate(param) and param_is_not_shared(param):
            total += param.detach().double().pow(2).sum()
    if torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized():
        torch.distributed.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return float(total.sqrt())


def train_line(plan, iteration, consumed_samples, lr, loss, grad_norm, seconds_per_iter,
               tokens_per_s, tflops, mfu, skipped, nan_iters, memory_mib: dict | None = None,
               loss_scale: float | None = None, extra: dict | None = None,
               global_batch_size: int | None = None) -> str:
    """Megatron-LM's training log line; ``memory_mib`` ({label: MiB}) adds peak-memory fields,
    ``loss_scale`` fp16's dynamic loss scale, ``extra`` fields after the grad norm
    (``num zeros``, ``params norm``); ``global_batch_size`` is this step's (default: the
    stage's)."""
    if global_batch_size is None:
        global_batch_size = plan.global_batch_size
    fields = [
        f"iteration {iteration:8d}/{plan.train_iters:8d}",
        f"consumed samples: {consumed_samples:12d}",
        f"consumed tokens: {consumed_samples * plan.tokens_per_sample:14d}",
        f"elapsed time per iteration (ms): {seconds_per_iter * 1000:.1f}",
        f"tokens per second: {tokens_per_s:.1f}",
        f"throughput per device (TFLOP/s): {tflops:.3f}",
    ]
    if mfu is not None:
        fields.append(f"MFU: {100 * mfu:.1f}%")
    fields += [
        f"learning rate: {lr:.6E}",
        f"global batch size: {global_batch_size:5d}",
        f"{plan.loss_name}: {loss:.6E}",
        *([f"loss scale: {loss_scale:.1f}"] if loss_scale is not None else []),
        f"grad norm: {grad_norm:.3f}",
        *[f"{label}: {value:.3f}" for label, value in (extra or {}).items()],
        f"number of skipped iterations: {skipped:3d}",
        f"number of nan iterations: {nan_iters:3d}",
    ]
    fields += [f"{label}: {value:.1f}" for label, value in (memory_mib or {}).items()]
    return f" [{datetime.now():%Y-%m-%d %H:%M:%S}] " + " | ".join(fields) + " |"


def eval_line(plan, iteration, results: dict) -> str:
    parts = [f"{name} value: {value:.6E}" for name, value in results.items()]
    return f" validation {plan.name} stage at iteration {iteration} | " + " | ".join(parts) + " |"


class TensorBoard:
    """A SummaryWriter when --tensorboard-dir is given and tensorboard is installed."""

    def __init__(self, log_dir: str | None, enabled: bool):
        self.writer = None
        if log_dir and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("WARNING: --tensorboard-dir given but tensorboard is not installed "
                      "(pip install tensorboard); logging to the console only", flush=True)
                return
            self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, values: dict, step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
