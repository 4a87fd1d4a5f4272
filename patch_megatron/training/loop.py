"""The training loop: one stage, megatron-core's schedules, per-token loss, eval, checkpoints.

Read top to bottom: ``forward_step``/``loss_func`` are what megatron's pipeline
schedule calls per micro-batch; ``train_step`` is one optimizer step;
``evaluate`` runs the validation split; ``train`` is the loop.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from functools import partial

import torch

from patch_megatron import parallel
from patch_megatron.stage import Stage
from patch_megatron.training import rerun


class NonFiniteLossError(RuntimeError):
    """The loss, the gradients or the learning rate was NaN/Inf and --nan-action is stop;
    or the weights are NaN/Inf when the run ends."""


@dataclass
class TrainState:
    iteration: int = 0  # steps of this stage done
    consumed_samples: int = 0  # samples of this stage's train set read
    skipped_iters: int = 0
    nan_iters: int = 0
    flops_so_far: float = 0.0  # the stage's model FLOPs (Megatron-LM's num_floating_point_operations_so_far)


# ---------------------------------------------------------------------------
# One micro-batch, as megatron's schedules want it.

def loss_func(loss_mask, per_token_losses, checks=None):
    """Megatron's per-token reduction: (sum of masked losses, number of tokens, report).

    ``checks`` (training steps only): the rerun machine's validations of the loss."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(per_token_losses.reshape(-1).float() * mask)
    num_tokens = mask.count_nonzero().to(torch.int)
    if checks is not None:
        rerun.validate_loss(loss_sum, checks)
    report = torch.stack([loss_sum.detach(), num_tokens.float()])
    return loss_sum, num_tokens, {"loss": report}


def forward_step(data_iterator, model, checks=None):
    batch = next(data_iterator)
    device = parallel.device()
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    # Positions are 0..T-1 (RoPE from the decoder input, learned ones set by the model); the
    # causal mask is built inside.
    per_token_losses = model(tokens, None, None, labels=labels)
    return per_token_losses, partial(loss_func, loss_mask, checks=checks)


def global_loss(loss_reports) -> tuple[float, float]:
    """(loss per token, tokens) over the global batch, known on every rank.

    Only the last pipeline stage holds reports; its tensor-parallel ranks hold
    the same numbers, hence the division by the TP size after the world sum.
    """
    from megatron.core import parallel_state

    total = torch.zeros(2, device=parallel.device())
    for report in loss_reports:
        total += report["loss"].to(total.device)
    if torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(total)
        total /= parallel_state.get_tensor_model_parallel_world_size()
    loss_sum, tokens = total.tolist()
    return loss_sum / max(tokens, 1.0), tokens


# ---------------------------------------------------------------------------
# One optimizer step.

@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    skipped: bool
    reason: str | None = None  # why a finite-loss step was skipped (non-finite grads or lr)
    num_zeros_in_grad: float | None = None  # with --log-num-zeros-in-grad
    # The rerun machine ends the run instead of this step: (save a checkpoint?, exit code).
    rerun_exit: tuple[bool, int] | None = None


def chunk_iterators(model: list, batches, num_microbatches: int):
    """What the schedule reads a step's micro-batches from: the iterator itself, or, with the
    interleaved schedule, one iterator per model chunk over the same micro-batches (each chunk
    runs all of them, the first and last chunks reading their tokens and labels)."""
    if len(model) == 1:
        return batches
    step = [next(batches) for _ in range(num_microbatches)]
    return [iter(step) for _ in model]


def train_step(model, optimizer, scheduler, data_iterator, num_microbatches, global_batch_size,
               args, iteration):
    """One step of ``num_microbatches`` micro-batches per data-parallel rank, which hold
    ``global_batch_size`` samples together. ``model``: this rank's model chunks (a list)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    machine = rerun.machine()
    checks = rerun.LossChecks.of(args)
    # The machine runs the forward and backward once, or again on the same micro-batches (the
    # replayable ``data_iterator`` rewound, the RNG states restored) when a result is rejected.
    while machine.should_run_forward_backward(data_iterator):
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=partial(forward_step, checks=checks),
            data_iterator=chunk_iterators(model, data_iterator, num_microbatches),
            model=model,
            num_microbatches=num_microbatches,
            seq_length=args.seq_length,  # T: what flows between pipeline stages
            micro_batch_size=args.micro_batch_size,
            forward_only=False,
        )
    should_save, should_exit, exit_code = machine.should_checkpoint_and_exit()
    loss, _ = global_loss(reports)
    if should_exit:
        return StepResult(loss, None, skipped=True, rerun_exit=(should_save, exit_code))
    if not math.isfinite(loss):
        message = f"iteration {iteration}: the training loss is {loss}"
        if args.nan_action == "stop":
            raise NonFiniteLossError(
                message + "; stopping without saving (the weights of this step are not written). "
                "Resume from the last checkpoint with a lower --lr, or pass --nan-action skip to "
                "drop such steps"
            )
        return StepResult(loss, None, skipped=True)
    # megatron's optimizer skips a step itself only on fp16's found_inf; a NaN/Inf gradient in
    # fp32/bf16, or a NaN/Inf learning rate, would be applied and poison the weights. In fp16 an
    # overflowing gradient is the loss scaler's business (it skips the step and lowers the scale).
    problem = non_finite_step(model, optimizer, check_gradients=not args.fp16)
    if problem is not None:
        message = f"iteration {iteration}: {problem}"
        if args.nan_action == "stop":
            raise NonFiniteLossError(
                message + "; stopping without saving (the weights of this step are not written). "
                "Resume from the last checkpoint with a lower --lr, or pass --nan-action skip to "
                "drop such steps"
            )
        return StepResult(loss, None, skipped=True, reason=problem)
    update_successful, grad_norm, num_zeros_in_grad = optimizer.step()
    if update_successful:  # the schedule counts samples, this step's, as Megatron-LM's
        scheduler.step(increment=global_batch_size)
    return StepResult(loss, grad_norm, skipped=not update_successful,
                      num_zeros_in_grad=num_zeros_in_grad)


def _any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return flag
    tensor = torch.tensor([float(flag)], device=parallel.device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


def non_finite_step(model, optimizer, check_gradients: bool = True) -> str | None:
    """What makes this step non-finite (on any rank), or None.

    The gradients are checked in the DDP grad buffers after megatron's data-parallel
    reduction: a NaN/Inf in a rank's unreduced part also makes the reduced sum NaN/Inf,
    so any rank's local check is enough. One pass over the gradients, one flag reduction.
    """
    lrs = [group["lr"] for group in optimizer.param_groups]
    if check_gradients and _any_rank(not _gradients_are_finite(model)):
        return "the gradients hold NaN/Inf"
    if not all(math.isfinite(float(lr)) for lr in lrs):
        return f"the learning rate is {lrs[0]}"
    return None


def _gradients_are_finite(model: list) -> bool:
    # megatron's DDP keeps its grad buffers in lists (a plain Module's .buffers is a method)
    buffers = [b for chunk in model for name in ("buffers", "expert_parallel_buffers")
               if isinstance(getattr(chunk, name, None), list) for b in getattr(chunk, name)]
    if buffers:
        return bool(torch.stack([torch.isfinite(b.grad_data).all() for b in buffers]).all())
    grads = [p.grad for chunk in model for p in chunk.parameters()
             if p.grad is not None]  # a stand-in model
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True


def weights_are_finite(model: list) -> bool:
    """Collective: True when every rank's weights are finite."""
    local = torch.stack([torch.isfinite(p).all() for chunk in model
                         for p in chunk.module.parameters()]).all()
    return not _any_rank(not bool(local.item()))


# ---------------------------------------------------------------------------
# Evaluation.

@contextlib.contextmanager
def token_level(model: list):
    """Run the same weights with K=1: the patch embedding's mean over one token is the
    token's embedding, and with patch_size 1 the model uses megatron's own loss."""
    with contextlib.ExitStack() as stack:
        for chunk in model:
            stack.enter_context(_chunk_at_token_level(chunk.module))
        yield


@contextlib.contextmanager
def _chunk_at_token_level(module):
    embedding = getattr(module, "embedding", None) if module.pre_process else None
    saved = module.patch_size, getattr(embedding, "patch_size", None)
    module.patch_size = 1
    if embedding is not None and saved[1] is not None:
        embedding.patch_size = 1
    try:
        yield
    finally:
        module.patch_size = saved[0]
        if embedding is not None and saved[1] is not None:
            embedding.patch_size = saved[1]


@torch.no_grad()
def eval_loss(model, batches, num_microbatches, args, eval_iters) -> float:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in model:
        chunk.eval()
    loss_sum = tokens = 0.0
    for _ in range(eval_iters):
        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=chunk_iterators(model, batches, num_microbatches),
            model=model,
            num_microbatches=num_microbatches,
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
            forward_only=True,
        )
        loss, n = global_loss(reports)
        loss_sum += loss * n
        tokens += n
    for chunk in model:
        chunk.train()
    return loss_sum / max(tokens, 1.0)


def evaluate(model, make_batches, data, num_microbatches, args, plan) -> dict:
    """Validation numbers of this stage, on the same first samples every time."""
    results = {}
    loss = eval_loss(model, make_batches(data.valid), num_microbatches, args, args.eval_iters)
    if plan.name == Stage.PATCH:
        results["patch loss"] = loss
        if data.valid_tokens is not None:
            with token_level(model):
                # K times as many T-token samples: the same tokens as the patch loss saw.
                nll = eval_loss(model, make_batches(data.valid_tokens), num_microbatches,
                                args, args.eval_iters * plan.patch_size)
            results["token nll (K=1)"] = nll
            results["token ppl (K=1)"] = math.exp(min(nll, 50.0))
    else:
        results["lm loss"] = loss
        results["lm loss PPL"] = math.exp(min(loss, 50.0))
    return results


# ---------------------------------------------------------------------------
# The loop.

@dataclass
class Run:
    """Everything the loop works with, built in pretrain_patch_gpt.py."""

    args: object
    plan: object  # arguments.StagePlan
    model: list  # this rank's model chunks: megatron DDP around each PatchGPTModel chunk
    optimizer: object
    scheduler: object
    data: object  # data.StageData
    make_batches: object  # (dataset, consumed_samples=0) -> micro-batch iterator
    num_microbatches: int  # of an evaluation step (the full global batch, as in Megatron-LM)
    step_batches: object  # batch_rampup.StepBatches: each training step's batch
    shape: ModelShape
    peak_tflops: float | None
    world_size: int
    print: object  # prints on rank 0
    tensorboard: object
    save: object  # (state) -> None


def wants_validation(args, data) -> bool:
    return bool(args.eval_iters) and data.valid is not None


def validate(run: Run, iteration: int, consumed_samples: int) -> None:
    """Evaluate and log one validation line (the format examples/quickstart.py parses)."""
    from patch_megatron.training.metrics import eval_line

    results = evaluate(run.model, run.make_batches, run.data, run.num_microbatches, run.args, run.plan)
    run.print(eval_line(run.plan, iteration, results))
    run.tensorboard.validation(results, iteration, consumed_samples)


def refuse_non_finite_end(run: Run, state: TrainState) -> None:
    """A run never ends as a success with NaN/Inf weights, saved or not."""
    if not weights_are_finite(run.model):
        kept = (f"the last good checkpoint in {run.args.save} stays latest" if run.args.save
                else "nothing was saved")
        raise NonFiniteLossError(
            f"iteration {state.iteration}: the weights hold NaN/Inf at the end of training ({kept}); "
            "rerun or resume with a lower --lr or a --clip-grad > 0")


class ParamGather:
    """``--overlap-param-gather``: the distributed optimizer's all-gather of the updated
    parameters runs in the next forward's pre-hooks (megatron-core's DDP), so between steps
    the parameters are stale. As in Megatron-LM, the hooks start after a first successful
    step, and whatever reads the parameters between steps (evaluation, a save, the end-of-run
    check) finishes the gather first (``current``)."""

    def __init__(self, model: list, enabled: bool):
        self.model, self.enabled, self.hooked = model, enabled, False
        if enabled:
            for chunk in model:
                chunk.disable_forward_pre_hook(param_sync=False)

    def after_step(self, skipped: bool) -> None:
        if self.enabled and not self.hooked and not skipped:
            for chunk in self.model:
                chunk.enable_forward_pre_hook()
            self.hooked = True

    @contextlib.contextmanager
    def current(self):
        if not self.hooked:
            yield
            return
        for chunk in self.model:
            chunk.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for chunk in self.model:
                chunk.enable_forward_pre_hook()


def train(run: Run, state: TrainState) -> str:
    """Train this stage from ``state`` to its last step (or an exit condition); say why it ended."""
    from patch_megatron.training.garbage_collection import manual_gc

    with manual_gc(run.args) as collector:  # --manual-gc
        return _train_stage(run, state, collector)


def _train_stage(run: Run, state: TrainState, collector) -> str:
    from patch_megatron import flops
    from patch_megatron.est.training import loop_controller
    from patch_megatron.training.exit_conditions import ExitConditions
    from patch_megatron.training.profiling import Profiler
    from patch_megatron.training.metrics import (IntervalMeter, max_over_ranks, params_norm,
                                                 peak_memory_mib,
                                                 step_flops, synchronize, throughput, train_line)

    args, plan = run.args, run.plan
    device = parallel.device()
    # Replayable: a rerun of the step reads its micro-batches again.
    batches = rerun.replayable(run.make_batches(run.data.train, state.consumed_samples))
    rerun.machine().current_iteration = state.iteration  # as Megatron-LM sets it
    exits = ExitConditions(args)
    meter = IntervalMeter()
    last_saved = state.iteration  # a loaded checkpoint is already on disk
    last_evaluated = None
    # EST (--est): each step's subnetwork is a function of (seed, iteration), so a resumed run
    # continues with the masks it would have drawn. Logged FLOPs are the subnetwork's.
    est = loop_controller(args, plan, run.shape, run.print)
    interval_flops = 0.0
    interval_samples = 0
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    profiler = Profiler(args, rank, run.print)
    gather = ParamGather(run.model, args.overlap_param_gather)
    # --rampup-batch-size: each step's batch follows the samples consumed so far, so a resumed
    # run (its consumed samples restored from the checkpoint) continues the ramp where it was.
    batch = run.step_batches
    batch.update(state.consumed_samples)
    while state.iteration < plan.train_iters:
        if batch.update(state.consumed_samples):
            run.print(f"> iteration {state.iteration}: global batch size ramped up to "
                      f"{batch.global_batch_size} samples ({batch.num_microbatches} "
                      "micro-batches per data-parallel rank)")
            # As in Megatron-LM: a checkpoint whenever the number of micro-batches changes.
            if args.save and last_saved != state.iteration:
                with gather.current():
                    run.save(state)
                last_saved = state.iteration
                meter.take()
                interval_flops, interval_samples = 0.0, 0
        global_batch_size = batch.global_batch_size
        profiler.before_step(state.iteration)
        lr = run.scheduler.optimizer.param_groups[0]["lr"]
        kept = est.set_step(run.model, state.iteration + 1) if est else flops.FULL_MODEL
        this_step_flops = step_flops(plan, run.shape, kept, global_batch_size)
        step_started = time.monotonic()
        step = train_step(run.model, run.optimizer, run.scheduler, batches,
                          batch.num_microbatches, global_batch_size, args, state.iteration + 1)
        if step.rerun_exit is not None:  # as in Megatron-LM: this step is not counted
            should_save, code = step.rerun_exit
            if should_save and args.save:
                with gather.current():
                    run.save(state)
            raise rerun.RerunExit(code, should_save and bool(args.save), state.iteration + 1)
        if est:
            est.record(this_step_flops, step_flops(plan, run.shape, flops.FULL_MODEL,
                                                   global_batch_size),
                       time.monotonic() - step_started, state.iteration + 1)
        interval_flops += this_step_flops
        interval_samples += global_batch_size
        state.iteration += 1
        state.consumed_samples += global_batch_size
        state.flops_so_far += this_step_flops
        meter.add()
        profiler.after_step(state.iteration)
        gather.after_step(step.skipped)
        if step.skipped:
            state.skipped_iters += 1
            if not math.isfinite(step.loss):
                state.nan_iters += 1
                run.print(f"WARNING: iteration {state.iteration}: the training loss is {step.loss}; "
                          "update skipped (--nan-action skip)")
            elif step.reason is not None:
                state.nan_iters += 1
                run.print(f"WARNING: iteration {state.iteration}: {step.reason}; "
                          "update skipped (--nan-action skip)")

        on_board = run.tensorboard.due(state.iteration)  # the same on every rank
        norm = None  # a collective: every rank computes it, at the same iterations
        if getattr(args, "log_params_norm", False) and (
                on_board or state.iteration % args.log_interval == 0):
            norm = params_norm(run.model)
        zeros = step.num_zeros_in_grad if getattr(args, "log_num_zeros_in_grad", False) else None
        if on_board:
            scale = run.optimizer.get_loss_scale().item() if args.fp16 else 1.0
            run.tensorboard.training(state.iteration, state.consumed_samples, {
                "learning-rate": lr, "batch-size": global_batch_size,
                plan.loss_name: step.loss, "grad-norm": step.grad_norm, "num-zeros": zeros,
                "params-norm": norm}, scale, run.world_size, device)

        if state.iteration % args.log_interval == 0:
            synchronize(device)  # the interval's time must include its queued GPU work
            seconds, n = meter.take()
            per_iter = seconds / max(n, 1)
            tokens_per_s, tflops, mfu = throughput(
                plan, run.shape, per_iter, run.world_size, run.peak_tflops,
                interval_flops / max(n, 1), interval_samples * plan.tokens_per_sample / max(n, 1))
            interval_flops, interval_samples = 0.0, 0
            grad_norm = step.grad_norm if step.grad_norm is not None else float("nan")
            memory = max_over_ranks(peak_memory_mib(device), device)
            loss_scale = run.optimizer.get_loss_scale().item() if args.fp16 else None
            extra = {}  # Megatron-LM's optional fields, after the grad norm
            if zeros is not None:
                extra["num zeros"] = float(zeros)
            if norm is not None:
                extra["params norm"] = norm
            run.print(train_line(plan, state.iteration, state.consumed_samples, lr, step.loss,
                                 grad_norm, per_iter, tokens_per_s, tflops, mfu,
                                 state.skipped_iters, state.nan_iters, memory, loss_scale, extra,
                                 global_batch_size=global_batch_size))
            run.tensorboard.interval(state.iteration, per_iter, tflops, tokens_per_s,
                                     state.consumed_samples * plan.tokens_per_sample)

        if wants_validation(args, run.data) and state.iteration % args.eval_interval == 0:
            with gather.current(), collector.evaluation():
                validate(run, state.iteration, state.consumed_samples)
            last_evaluated = state.iteration
            meter.take()  # keep evaluation time out of the training throughput
            interval_flops, interval_samples = 0.0, 0

        if args.save and args.save_interval and state.iteration % args.save_interval == 0:
            with gather.current():
                run.save(state)
            last_saved = state.iteration
            meter.take()
            interval_flops, interval_samples = 0.0, 0
        collector.after_step(state.iteration)
        reason = exits.reason(state.iteration)
        if reason is not None:
            # As in Megatron-LM, an early exit (signal, time, --exit-interval) saves and stops
            # without a final evaluation: a SIGTERM'd job has little time left.
            with gather.current():
                refuse_non_finite_end(run, state)
                if args.save and last_saved != state.iteration:
                    run.save(state)
            if est:
                run.print(est.summary())
            return f"{reason} at iteration {state.iteration}"
    with gather.current():
        refuse_non_finite_end(run, state)
        if args.save and last_saved != state.iteration:
            run.save(state)
        # As in Megatron-LM, the finished run is evaluated once more (after its last save), so
        # its last validation figure is of the final weights, unless the last iteration just was.
        if wants_validation(args, run.data) and last_evaluated != state.iteration:
            validate(run, state.iteration, state.consumed_samples)
    if est:
        run.print(est.summary())
    return f"{plan.name} stage finished: {state.iteration} iterations"
