"""What a log line reports: throughput, TFLOP/s, MFU, peak memory; the console line; TensorBoard."""

from __future__ import annotations

import os
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


def params_norm(model: list) -> float:
    """The L2 norm of the model chunks' parameters, each counted once (Megatron-LM's --log-params-norm):
    tensor-parallel copies and the tied output layer's copy of the embedding are left out, and
    the squares are summed over the tensor- and pipeline-parallel ranks."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    parameters = [p for chunk in model for p in chunk.parameters()]
    total = torch.zeros(1, dtype=torch.float64, device=parameters[0].device)
    for param in parameters:
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


# Validation results that are perplexities, and the loss each is of (Megatron-LM writes a loss
# as "<key> validation" and, with --log-validation-ppl-to-tensorboard, its "<key> validation ppl").
_PERPLEXITY_OF = {"lm loss PPL": "lm loss", "token ppl (K=1)": "token nll (K=1)"}


class TensorBoard:
    """Megatron-LM's TensorBoard scalars, under its names, when --tensorboard-dir is given and
    tensorboard is installed, and to Weights & Biases with --wandb-project (this rank writes
    when ``enabled``). W&B gets each scalar under the same name, against the iteration (its
    step), as Megatron-LM logs them; the "vs samples" copies are TensorBoard's.

    Every --tensorboard-log-interval iterations: the learning rate, batch size, loss, loss scale
    (unless --no-log-loss-scale-to-tensorboard), grad norm, and with their flags the world
    size, memory, num zeros and params norm; each also "vs samples" (consumed samples on the
    x axis). Every --log-interval iterations: with --log-timers-to-tensorboard the time per
    iteration and the TFLOP/s per device ("throughput"), and always this project's tokens per
    second and consumed tokens. Each validation: its losses, and with
    --log-validation-ppl-to-tensorboard their perplexities. Values of None are left out.
    """

    def __init__(self, args, enabled: bool):
        self.writer = self.wandb = None
        self.log_dir = getattr(args, "tensorboard_dir", None)
        self.wandb_project = getattr(args, "wandb_project", "")
        if not (self.log_dir or self.wandb_project):
            return
        self.log_interval = args.tensorboard_log_interval
        self.loss_scale = args.log_loss_scale_to_tensorboard
        self.world_size = args.log_world_size_to_tensorboard
        self.memory = args.log_memory_to_tensorboard
        self.timers = args.log_timers_to_tensorboard
        self.validation_ppl = args.log_validation_ppl_to_tensorboard
        if enabled and self.wandb_project:
            self.wandb = start_wandb(args)
        if enabled and self.log_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("WARNING: --tensorboard-dir given but tensorboard is not installed "
                      "(pip install tensorboard); logging to the console only", flush=True)
                return
            self.writer = SummaryWriter(log_dir=self.log_dir, max_queue=args.tensorboard_queue_size)

    @property
    def writing(self) -> bool:
        return self.writer is not None or self.wandb is not None

    def _add(self, name: str, value, iteration: int, consumed_samples: int | None = None) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, iteration)
            if consumed_samples is not None:
                self.writer.add_scalar(f"{name} vs samples", value, consumed_samples)
        if self.wandb is not None:
            self.wandb.log({name: value}, step=iteration)

    def due(self, iteration: int) -> bool:
        """Whether ``training`` writes at this iteration; the same on every rank (it decides
        collectives such as the params norm), whichever rank writes."""
        return bool(self.log_dir or self.wandb_project) and iteration % self.log_interval == 0

    def training(self, iteration: int, consumed_samples: int, values: dict, loss_scale: float,
                 world_size: int, device: torch.device) -> None:
        if not self.writing:
            return
        values = dict(values)
        if self.loss_scale:
            values["loss-scale"] = loss_scale
        if self.world_size:
            values["world-size"] = world_size
        for name, value in values.items():
            if value is not None:
                self._add(name, value, iteration, consumed_samples)
        if self.memory:
            self.scalars(_memory_scalars(device), iteration)

    def interval(self, iteration: int, seconds_per_iter: float, tflops: float,
                 tokens_per_s: float, consumed_tokens: int) -> None:
        if not self.writing:
            return
        if self.timers:
            self.scalars({"iteration-time": seconds_per_iter, "throughput": tflops}, iteration)
        self.scalars({"tokens-per-second": tokens_per_s, "consumed-tokens": consumed_tokens},
                     iteration)

    def validation(self, results: dict, iteration: int, consumed_samples: int) -> None:
        if not self.writing:
            return
        for key, value in results.items():
            if key not in _PERPLEXITY_OF:
                name = f"{key} validation"
            elif self.validation_ppl:
                name = f"{_PERPLEXITY_OF[key]} validation ppl"
            else:
                continue
            self._add(name, value, iteration, consumed_samples)

    def scalars(self, values: dict, step: int) -> None:
        for name, value in values.items():
            self._add(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(args):
    """The W&B run of --wandb-project (Megatron-LM's settings). Without WANDB_API_KEY or
    WANDB_MODE it runs offline (``wandb sync`` uploads it later): a cluster node often has no
    network, and an online run without a key would stop to ask for one."""
    import wandb  # its presence is checked at start-up (arguments.check_world_size)

    from patch_megatron.training.checkpoint_record import plain_flags

    save_dir = args.wandb_save_dir or os.path.join(args.save, "wandb")
    os.makedirs(save_dir, exist_ok=True)
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    if mode == "offline":
        print(f"W&B: no WANDB_API_KEY or WANDB_MODE, so the run is written offline under "
              f"{save_dir}; upload it with `wandb sync`", flush=True)
    settings = dict(dir=save_dir, name=args.wandb_exp_name, project=args.wandb_project,
                    config=plain_flags(args), mode=mode)
    if args.wandb_entity:
        settings["entity"] = args.wandb_entity
    return wandb.init(**settings)


def _memory_scalars(device: torch.device) -> dict:
    """This rank's memory: Megatron-LM's four allocator figures on GPU, the peak RSS on CPU."""
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        return {"mem-reserved-bytes": stats["reserved_bytes.all.current"],
                "mem-allocated-bytes": stats["allocated_bytes.all.current"],
                "mem-max-allocated-bytes": stats["allocated_bytes.all.peak"],
                "mem-allocated-count": stats["allocation.all.current"]}
    return {"mem-max-rss-bytes": peak_rss_bytes()}
