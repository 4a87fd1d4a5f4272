"""Merge megatron .bin/.idx datasets into one (documents kept in input order).

Example:
    python tools/merge_datasets.py --input data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document

--input also accepts a directory: every PREFIX.idx/.bin pair in it, sorted by name
(a name with a PREFIX.idx next to it is that prefix, even where training has made
a PREFIX/ folder for megatron's index cache).
"""

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from patch_megatron.data.merge import merge_prefixes  # noqa: E402


def expand_prefixes(inputs):
    prefixes = []
    for item in inputs:
        # Training leaves a folder named like the prefix (megatron's index cache,
        # PREFIX/cache/): next to PREFIX.idx the name means the prefix.
        if os.path.isdir(item) and not os.path.isfile(item + ".idx"):
            found = sorted(p[:-4] for p in glob.glob(os.path.join(item, "*.idx")))
            if not found:
                raise ValueError(f"{item}: a directory with no PREFIX.idx/.bin pairs in it, and "
                                 f"no {os.path.basename(item)}.idx next to it; pass data "
                                 f"prefixes (PREFIX for PREFIX.bin/.idx) or a directory of "
                                 f"them.")
            prefixes.extend(found)
        else:
            prefixes.append(item[:-4] if item.endswith((".bin", ".idx")) else item)
    return prefixes


def main(argv=None) -> int:
    from patch_megatron.model.spec import silence_fallback_warnings

    silence_fallback_warnings()
    parser = argparse.ArgumentParser(description="Merge megatron .bin/.idx datasets.")
    parser.add_argument("--input", nargs="+", required=True,
                        help="data prefixes (or directories of them) in merge order")
    parser.add_argument("--output-prefix", required=True,
                        help="writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    args = parser.parse_args(argv)
    try:
        summary = merge_prefixes(expand_prefixes(args.input), args.output_prefix)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"merged {summary.inputs} datasets: {summary.documents} documents, "
          f"{summary.tokens} tokens -> {summary.output_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
