#!/usr/bin/env python
"""Import a local Hugging Face Llama directory as a checkpoint of ours, to continue pretraining.

    python tools/convert_from_hf.py --hf-dir HF_DIR --save SAVE_DIR \\
        [--target-tensor-parallel-size 2] [--target-pipeline-parallel-size 2] \\
        [--make-vocab-size-divisible-by 128] [--dtype bfloat16] [--force]

Writes a weights-only checkpoint (iteration 0, patch size 1) that
``pretrain_patch_gpt.py --load SAVE_DIR`` starts from with a fresh optimizer
and schedule; prints the model flags that run needs.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser():
    from patch_megatron.conversion.model_description import DTYPES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--hf-dir", required=True, help="local directory with config.json + safetensors")
    p.add_argument("--save", required=True, help="checkpoint directory to write")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="as the training run will pass it (the vocabulary is padded to a multiple "
                        "of this x TP)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: the config's torch_dtype")
    p.add_argument("--force", action="store_true", help="replace a non-empty --save")
    return p


def main(argv=None) -> int:
    from patch_megatron.model.spec import silence_fallback_warnings

    silence_fallback_warnings()
    args = build_parser().parse_args(argv)
    from patch_megatron.conversion.errors import ConversionError
    from patch_megatron.conversion.output_dir import refuse_overlap

    try:
        refuse_overlap(args.hf_dir, "--hf-dir", args.save, "--save")
    except ConversionError as error:
        print(f"convert_from_hf.py: error: {error}", file=sys.stderr)
        return 2
    from patch_megatron.conversion.hf_import import ImportOptions, import_from_hf
    from patch_megatron.conversion.model_description import DTYPES

    options = ImportOptions(
        hf_dir=args.hf_dir, save=args.save,
        tensor_parallel_size=args.target_tensor_parallel_size,
        pipeline_parallel_size=args.target_pipeline_parallel_size,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        dtype=DTYPES[args.dtype] if args.dtype else None, force=args.force,
    )
    try:
        path, flags = import_from_hf(options)
    except ConversionError as error:
        print(f"convert_from_hf.py: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}\ncontinue pretraining with: pretrain_patch_gpt.py --load {args.save} "
          + " ".join(flags) + " ... (data, batch and length flags)")
    return 0


if __name__ == "__main__":  # dist_checkpointing may start worker processes that import this file
    sys.exit(main())
