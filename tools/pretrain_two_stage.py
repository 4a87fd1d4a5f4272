#!/usr/bin/env python
"""Run patch-level pretraining's two stages back to back: patch stage, handoff, token stage.

    python tools/pretrain_two_stage.py --train-tokens D --patch-size K --patch-data-fraction λ \\
        --global-batch-size B --save DIR [--dry-run] [node flags] PRETRAIN_FLAGS...

From the whole run's token budget D, K, λ and the token stage's global batch
B it plans both stages (the patch stage gets B/K samples of K·T tokens per
step, so both see B·T tokens per step), prints the plan, then runs
pretrain_patch_gpt.py for the patch stage (DIR/patch),
tools/convert_patch_to_token.py (DIR/token_init) and pretrain_patch_gpt.py for
the token stage (DIR/token). PRETRAIN_FLAGS (model, data, optimizer, logging:
Megatron-LM's names and defaults, see ``python pretrain_patch_gpt.py --help``;
the paper's LLaMA recipe is the flags of ``patch_megatron/llama_recipe.py``) go
unchanged to both stages.

Run the same command again to continue: finished stages are skipped, an
interrupted one resumes from its last checkpoint. On several nodes run it on
each with its --node-rank (default $NODE_RANK); DIR must be on a filesystem all
nodes share, because node rank 0 alone converts and the others wait for it.
"""

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def build_parser(launch_defaults: dict) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_two_stage.py", description=__doc__.split("\n\n")[0],
        epilog="Every other flag is passed unchanged to pretrain_patch_gpt.py for both stages.",
        allow_abbrev=False)
    g = p.add_argument_group("the run (the runner sets these per stage)")
    g.add_argument("--train-tokens", type=int, required=True,
                   help="token budget of both stages together")
    g.add_argument("--patch-size", type=int, required=True, help="K of the patch stage (e.g. 4)")
    g.add_argument("--patch-data-fraction", type=float, required=True,
                   help="λ, the share of the tokens the patch stage trains on (e.g. 0.6667)")
    g.add_argument("--global-batch-size", type=int, required=True,
                   help="the token stage's samples per step (B); the patch stage gets B/K")
    g.add_argument("--save", required=True,
                   help="run directory: DIR/patch, DIR/token_init and DIR/token are written there")
    g.add_argument("--dry-run", action="store_true",
                   help="print the plan and the exact commands, run nothing")
    g = p.add_argument_group("launch (torch.distributed.run; defaults from Megatron-LM's variables)")
    g.add_argument("--nproc-per-node", type=int, default=launch_defaults["nproc_per_node"],
                   help="processes per node (default: $GPUS_PER_NODE, else 1)")
    g.add_argument("--nnodes", type=int, default=launch_defaults["nnodes"],
                   help="default: $NNODES, else 1")
    g.add_argument("--node-rank", type=int, default=launch_defaults["node_rank"],
                   help="default: $NODE_RANK, else 0")
    g.add_argument("--master-addr", default=launch_defaults["master_addr"],
                   help="default: $MASTER_ADDR, else localhost")
    g.add_argument("--master-port", type=int, default=launch_defaults["master_port"],
                   help="default: $MASTER_PORT, else 6000")
    return p


def main(argv=None) -> int:
    from patch_megatron.two_stage.launch import StageStopped, run_steps
    from patch_megatron.two_stage.plan import (Launch, RunConfig, TwoStageError, format_plan,
                                               launch_defaults, plan_two_stage)
    from patch_megatron.two_stage.progress import format_steps, next_steps

    try:
        parser = build_parser(launch_defaults())
    except TwoStageError as error:
        print(f"pretrain_two_stage.py: error: {error}", file=sys.stderr)
        return 2
    args, passthrough = parser.parse_known_args(argv)
    launch = Launch(args.nproc_per_node, args.nnodes, args.node_rank,
                    args.master_addr, args.master_port)
    config = RunConfig(
        train_tokens=args.train_tokens, patch_size=args.patch_size,
        patch_data_fraction=args.patch_data_fraction, global_batch_size=args.global_batch_size,
        save=os.path.abspath(args.save), passthrough=tuple(passthrough), launch=launch)
    try:
        plan = plan_two_stage(config)
        steps = next_steps(plan, REPO)
    except TwoStageError as error:
        print(f"pretrain_two_stage.py: error: {error}", file=sys.stderr)
        return 2
    print(format_plan(plan), flush=True)
    print(flush=True)
    if args.dry_run:
        print(format_steps(steps))
        return 0
    try:
        run_steps(steps, launch, print_fn=lambda text: print(text, flush=True))
    except TwoStageError as error:
        print(f"pretrain_two_stage.py: error: {error}", file=sys.stderr)
        return 2
    except StageStopped as error:
        print(f"pretrain_two_stage.py: {error}", file=sys.stderr)
        return 1
    print(f"done: the token stage's checkpoint is {plan.token.save_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
