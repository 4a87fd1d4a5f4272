#!/usr/bin/env python
"""Export a checkpoint of ours (any TP/PP) to a Hugging Face LlamaForCausalLM directory.

    python tools/convert_to_hf.py --load SAVE_DIR --output HF_DIR \\
        [--iteration N] [--tokenizer-model tokenizer.model] [--dtype bfloat16] \\
        [--max-shard-size 5GB] [--allow-patch-stage] [--force]

Runs in one CPU process (no torchrun, no GPU). Writes config.json,
generation_config.json, safetensors weights (sharded above --max-shard-size,
with model.safetensors.index.json) and, with --tokenizer-model, the tokenizer
files. The padded vocabulary is trimmed to the tokenizer's size.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser():
    from patch_megatron.conversion.model_description import DTYPES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="checkpoint directory (the run's --save)")
    p.add_argument("--iteration", type=int, default=None, help="default: the latest")
    p.add_argument("--output", required=True, help="the Hugging Face directory to write")
    p.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece .model the model was trained with; exported beside the "
                        "weights, and its size trims the vocabulary")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="the tokenizer's vocabulary size, when no --tokenizer-model is given and "
                        "the checkpoint's flags do not tell it")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights' dtype (default: the checkpoint's)")
    p.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--allow-patch-stage", action="store_true",
                   help="export a patch-stage checkpoint anyway (its weights are meant for K=1 "
                        "continuation, not for serving)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --output")
    return p


def main(argv=None) -> int:
    from patch_megatron.model.spec import silence_fallback_warnings

    silence_fallback_warnings()
    args = build_parser().parse_args(argv)
    from patch_megatron.conversion.errors import ConversionError
    from patch_megatron.conversion.output_dir import refuse_overlap

    try:
        refuse_overlap(args.load, "--load", args.output, "--output")
    except ConversionError as error:
        print(f"convert_to_hf.py: error: {error}", file=sys.stderr)
        return 2
    from patch_megatron.conversion.hf_export import ExportOptions, export_to_hf
    from patch_megatron.conversion.model_description import DTYPES

    options = ExportOptions(
        load=args.load, output=args.output, iteration=args.iteration,
        tokenizer_model=args.tokenizer_model, vocab_size=args.vocab_size,
        dtype=DTYPES[args.dtype] if args.dtype else None, max_shard_size=args.max_shard_size,
        allow_patch_stage=args.allow_patch_stage, force=args.force,
    )
    try:
        files = export_to_hf(options)
    except ConversionError as error:
        print(f"convert_to_hf.py: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {', '.join(files)}")
    return 0


if __name__ == "__main__":  # dist_checkpointing may start worker processes that import this file
    sys.exit(main())
