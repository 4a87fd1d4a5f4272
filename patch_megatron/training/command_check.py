"""``--check-only WORLD_SIZE``: what a command line would train, printed without training.

Run on a laptop before a cluster launch: every check of the flags runs (against the
given world size instead of the launcher's), then the arguments as Megatron-LM prints
them and the effective model, optimizer, schedule and data plan. Nothing starts: no
process group, no model, no data read beyond the tokenizer's vocabulary size.
"""

from __future__ import annotations

import dataclasses

from patch_megatron.training import arguments, build


def _vocab_size(args) -> tuple[int | None, str]:
    """The vocabulary the run will size its model for (as training/data.py finds it)."""
    if args.mock_data and args.vocab_size is not None:
        return args.vocab_size, "from --vocab-size"
    try:
        from patch_megatron.data.tokenizers import build_tokenizer_from_args

        return build_tokenizer_from_args(args).vocab_size, "from the tokenizer"
    except (OSError, ValueError) as error:
        return None, f"unknown here ({error})"


def _schedule(args, plan, unit: str) -> str:
    """The learning-rate schedule in steps, or in samples (a ramp's steps are not all alike)."""
    in_samples = unit == "samples"
    warmup = plan.lr_warmup_samples if in_samples else plan.lr_warmup_iters
    decay = plan.lr_decay_samples if in_samples else plan.lr_decay_iters
    wsd = plan.lr_wsd_decay_samples if in_samples else plan.lr_wsd_decay_iters
    return (f"  lr {args.lr_warmup_init} -> {args.lr} over {warmup} warmup {unit}, then "
            f"{args.lr_decay_style} to {args.min_lr} over {decay} {unit}"
            + (f" (WSD: final {args.lr_wsd_decay_style} decay of {wsd} {unit})"
               if args.lr_decay_style == "WSD" else ""))


def report(args, dp: int) -> str:
    plan = args.stage
    vocab, origin = _vocab_size(args)
    lines = ["model:"]
    if vocab is None:
        lines.append(f"  vocabulary {origin}; the rest as below with a placeholder vocabulary")
    config = build.model_config(args, vocab or 1)
    for field in dataclasses.fields(config):
        lines.append(f"  {field.name}: {getattr(config, field.name)}")
    if vocab is not None:
        lines.append(f"  (vocabulary {vocab} {origin}, padded to {config.vocab_size})")
    ramped = plan.rampup_batch_size is not None  # a step is then not a fixed number of samples
    start_wd = args.weight_decay if args.start_weight_decay is None else args.start_weight_decay
    end_wd = args.weight_decay if args.end_weight_decay is None else args.end_weight_decay
    lines += [
        "optimizer:",
        f"  Adam (decoupled weight decay): beta1 {args.adam_beta1}, beta2 {args.adam_beta2}, "
        f"eps {args.adam_eps}; weight decay {start_wd} -> {end_wd} ({args.weight_decay_incr_style}); "
        f"clip {args.clip_grad}",
        f"  precision {'bf16' if args.bf16 else 'fp16' if args.fp16 else 'fp32'}; "
        f"{'distributed' if args.use_distributed_optimizer else 'plain'} optimizer; gradients "
        f"reduced in {'fp32' if build.grad_reduce_in_fp32(args) else 'the parameter dtype'}",
        "schedule:",
        _schedule(args, plan, "samples" if ramped else "steps"),
        "data:",
        f"  {plan.name} stage, K={plan.patch_size}, T={plan.seq_length}: {plan.train_iters} steps "
        f"of {'up to ' if ramped else ''}{plan.global_batch_size} samples = "
        f"{plan.tokens_per_step} tokens ({plan.train_tokens} tokens), from token "
        f"{plan.data_start_token} of the stream",
    ]
    per_rank = f"{arguments.num_microbatches(args, dp)}"
    if ramped:
        from patch_megatron.training import batch_rampup

        lines.append("  " + batch_rampup.describe(plan, args.micro_batch_size))
        first = plan.rampup_batch_size[0] // (args.micro_batch_size * dp)
        per_rank = f"{first} growing to {per_rank}"
    lines.append(f"  {per_rank} micro-batches of {args.micro_batch_size} per step on each of {dp} "
                 f"data-parallel ranks (TP {args.tensor_model_parallel_size} x PP "
                 f"{args.pipeline_model_parallel_size} x DP {dp})")
    return "\n".join(lines)
