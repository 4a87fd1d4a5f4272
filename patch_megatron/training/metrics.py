"""What a log line reports: throughput, TFLOP/s, MFU; the console line; TensorBoard."""

from __future__ import annotations

import time
from datetime import datetime

import torch

from patch_megatron import flops


def model_shape(config) -> flops.ModelShape:
    return flops.ModelShape(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads,
        vocab_size=config.vocab_size,
        num_query_groups=config.num_query_groups,
    )


def device_peak_tflops(args, on_cpu: bool) -> float | None:
    """The per-device bf16 peak for MFU: --peak-tflops, else a known GPU's, else none."""
    if args.peak_tflops is not None:
        return args.peak_tflops
    if on_cpu or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for gpu, peak in flops.GPU_PEAK_BF16_TFLOPS.items():
        if gpu in name:
            return peak
    return None


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
               step_flops: float | None = None):
    """tokens/s, TFLOP/s per device and MFU (None without a known peak) of one step's timing.

    ``step_flops`` is the FLOPs one step really ran (EST's subnetworks); None: the full model's.
    """
    if step_flops is None:
        step_flops = flops.training_flops_per_iteration(
            shape, plan.seq_length, plan.global_batch_size, plan.patch_size
        )
    tflops = step_flops / seconds_per_iter / world_size / 1e12
    mfu = tflops / peak_tflops if peak_tflops else None
    return plan.tokens_per_step / seconds_per_iter, tflops, mfu


def train_line(plan, iteration, consumed_samples, lr, loss, grad_norm, seconds_per_iter,
               tokens_per_s, tflops, mfu, skipped, nan_iters) -> str:
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
        f"global batch size: {plan.global_batch_size:5d}",
        f"{plan.loss_name}: {loss:.6E}",
        f"grad norm: {grad_norm:.3f}",
        f"number of skipped iterations: {skipped:3d}",
        f"number of nan iterations: {nan_iters:3d}",
    ]
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
