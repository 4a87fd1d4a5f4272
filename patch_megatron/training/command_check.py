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
        f"  lr {args.lr_warmup_init} -> {args.lr} over {plan.lr_warmup_iters} warmup steps, then "
        f"{args.lr_decay_style} to {args.min_lr} over {plan.lr_decay_iters} steps"
        + (f" (WSD: final {args.lr_wsd_decay_style} decay of {plan.lr_wsd_decay_iters} steps)"
           if args.lr_decay_style == "WSD" else ""),
        "data:",
        f"  {plan.name} stage, K={plan.patch_size}, T={plan.seq_length}: {plan.train_iters} steps "
        f"of {plan.global_batch_size} samples = {plan.tokens_per_step} tokens "
        f"({plan.train_tokens} tokens), from token {plan.data_start_token} of the stream",
        f"  {arguments.num_microbatches(args, dp)} micro-batches of {args.micro_batch_size} per "
        f"step on each of {dp} data-parallel ranks (TP {args.tensor_model_parallel_size} x PP "
        f"{args.pipeline_model_parallel_size} x DP {dp})",
    ]
    return "\n".join(lines)
