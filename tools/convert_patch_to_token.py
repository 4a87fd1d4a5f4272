#!/usr/bin/env python
"""Hand the patch stage's weights to the token stage (weights only, as the paper does).

    python tools/convert_patch_to_token.py --load PATCH_SAVE --save TOKEN_INIT \\
        [--iteration N] [--target-tensor-parallel-size 2] [--target-pipeline-parallel-size 2] \\
        [--vocab-size V] [--force]

Writes TOKEN_INIT/iter_0000000: the patch stage's weights with patch size 1, no
optimizer, scheduler or RNG state, iteration 0, and the patch stage's data
position. ``pretrain_patch_gpt.py --load TOKEN_INIT --patch-size 1
--patch-data-fraction λ ...`` then starts the token stage with a fresh
optimizer and schedule on the stream after the patch stage's share.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="the patch stage's checkpoint directory (--save)")
    p.add_argument("--iteration", type=int, default=None, help="default: the latest")
    p.add_argument("--save", required=True, help="the token stage's initial checkpoint directory")
    p.add_argument("--target-tensor-parallel-size", type=int, default=None,
                   help="TP of the token stage (default: the patch stage's); re-pads the vocabulary "
                        "to what that TP expects")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=None,
                   help="PP of the token stage (default: the patch stage's)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="the tokenizer's vocabulary size, if re-padding needs it and the patch "
                        "stage's tokenizer file is not reachable")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --save; convert a checkpoint that is already token-level")
    return p


def main(argv=None) -> int:
    from patch_megatron.model.spec import silence_fallback_warnings

    silence_fallback_warnings()
    args = build_parser().parse_args(argv)
    from patch_megatron.conversion.errors import ConversionError
    from patch_megatron.conversion.output_dir import refuse_overlap

    try:
        refuse_overlap(args.load, "--load", args.save, "--save")
    except ConversionError as error:
        print(f"convert_patch_to_token.py: error: {error}", file=sys.stderr)
        return 2
    from patch_megatron.conversion.handoff import HandoffOptions, convert_patch_to_token

    options = HandoffOptions(
        load=args.load, save=args.save, iteration=args.iteration,
        target_tensor_parallel_size=args.target_tensor_parallel_size,
        target_pipeline_parallel_size=args.target_pipeline_parallel_size,
        vocab_size=args.vocab_size, force=args.force,
    )
    try:
        path, position = convert_patch_to_token(options)
    except ConversionError as error:
        print(f"convert_patch_to_token.py: error: {error}", file=sys.stderr)
        return 2
    if position:
        lam = position.get("patch_data_fraction")
        print(f"wrote {path}: weights of the patch stage (K={position['patch_size']}, iteration "
              f"{position['iteration']}), which read {position['consumed_samples']} samples = "
              f"{position['consumed_tokens']} tokens of the stream.\nStart the token stage with: "
              f"pretrain_patch_gpt.py --load {args.save} --patch-size 1 --patch-data-fraction {lam} "
              "... (the same model, data and --train-tokens flags as the patch stage)")
    else:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # dist_checkpointing may start worker processes that import this file
    sys.exit(main())
