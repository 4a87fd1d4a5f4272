#!/usr/bin/env python
"""Compute-optimal planner for (patch-level) pretraining: model size, tokens,
predicted loss, savings, and the commands to run. See patch_megatron/planning.

Examples:
    python tools/plan_compute.py --compute 1e21
    python tools/plan_compute.py --gpus 64 --hours 72 --gpu H100 --patch-size 4 --patch-fraction 0.667
    python tools/plan_compute.py --params 1.3e9 --json
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from patch_megatron.planning import chinchilla  # noqa: E402
from patch_megatron.planning.commands import CommandOptions, build_commands  # noqa: E402
from patch_megatron.planning.plan import DEFAULT_EST_FLOPS_FACTOR, PlanInputs, PlanningError, compute_plan  # noqa: E402
from patch_megatron.planning.report import to_json, to_text  # noqa: E402


def finite_float(text: str) -> float:
    """A float flag that is a real number: inf and nan have no plan (argparse prints the error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number: give a real value, "
                                         "e.g. 1e21")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = p.add_argument_group("budget (any of)")
    budget.add_argument("--compute", type=finite_float, help="training FLOP budget, e.g. 1e21")
    budget.add_argument("--gpus", type=int, help="number of GPUs")
    budget.add_argument("--hours", type=finite_float, help="wall-clock hours on --gpus (budget = GPUs × hours × peak × MFU)")
    budget.add_argument("--gpu", default="H100", help="H100, H200, A100, or a bf16 peak in TFLOP/s (default H100)")
    budget.add_argument("--mfu", type=finite_float, help="model FLOPs utilisation in (0, 1]; default: our measured MFU, "
                                                  "else an assumed 0.40 (stated in the output)")
    budget.add_argument("--params", type=finite_float, help="fixed model size, total parameters incl. embeddings")
    budget.add_argument("--tokens", type=finite_float, help="fixed number of training tokens")
    patch = p.add_argument_group("patch-level training and EST")
    patch.add_argument("--patch-size", type=int, default=4, help="K (1 = token-only; default 4)")
    patch.add_argument("--patch-fraction", type=finite_float, default=2 / 3, help="λ in [0, 1) (default 2/3)")
    patch.add_argument("--est", action="store_true", help="plan with Evolving Subnetwork Training")
    patch.add_argument("--est-flops-factor", type=finite_float, default=DEFAULT_EST_FLOPS_FACTOR,
                       help=f"EST's expected FLOPs relative to full training (default {DEFAULT_EST_FLOPS_FACTOR})")
    fit = p.add_argument_group("Chinchilla")
    fit.add_argument("--sizing", choices=("rule", "fit"), default="rule",
                     help="rule: ~20 tokens/parameter (default); fit: minimise the loss fit at the budget")
    fit.add_argument("--loss-fit", choices=sorted(chinchilla.LOSS_FITS), default=chinchilla.DEFAULT_LOSS_FIT,
                     help=f"parametric loss fit for predicted loss (default {chinchilla.DEFAULT_LOSS_FIT})")
    fit.add_argument("--tokens-per-param", type=finite_float, default=chinchilla.TOKENS_PER_PARAMETER)
    run = p.add_argument_group("run")
    run.add_argument("--seq-length", type=int, default=2048, help="T, model positions per sample (default 2048)")
    run.add_argument("--vocab-size", type=int, default=32000, help="tokenizer vocabulary (default 32000, LLaMA-2)")
    run.add_argument("--global-batch-tokens", type=int, help="tokens per step (default: from the shape table)")
    run.add_argument("--micro-batch-size", type=int, default=1)
    defaults = CommandOptions()
    run.add_argument("--data-path", default=defaults.data_path)
    run.add_argument("--tokenizer-type", default=defaults.tokenizer_type)
    run.add_argument("--tokenizer-model", default=defaults.tokenizer_model)
    run.add_argument("--run-dir", default=defaults.run_dir, help="checkpoints go under this folder")
    run.add_argument("--split", default=defaults.split)
    run.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    inputs = PlanInputs(
        compute=args.compute, gpus=args.gpus, hours=args.hours, gpu=args.gpu, mfu=args.mfu,
        parameters=args.params, tokens=args.tokens,
        patch_size=args.patch_size, patch_fraction=args.patch_fraction,
        est=args.est, est_flops_factor=args.est_flops_factor,
        sizing=args.sizing, loss_fit=args.loss_fit, tokens_per_parameter=args.tokens_per_param,
        seq_length=args.seq_length, vocab_size=args.vocab_size,
        global_batch_tokens=args.global_batch_tokens, micro_batch_size=args.micro_batch_size,
    )
    options = CommandOptions(data_path=args.data_path, tokenizer_type=args.tokenizer_type,
                             tokenizer_model=args.tokenizer_model, run_dir=args.run_dir,
                             split=args.split, seed=args.seed)
    try:
        plan = compute_plan(inputs)
    except PlanningError as err:
        print(f"plan_compute: error: {err}", file=sys.stderr)
        return 2
    commands = build_commands(plan, options)
    print(to_json(plan, commands) if args.json else to_text(plan, commands))
    return 0


if __name__ == "__main__":
    sys.exit(main())
