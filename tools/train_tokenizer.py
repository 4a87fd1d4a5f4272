"""Train a SentencePiece tokenizer (BPE by default) for this project.

Example:
    python tools/train_tokenizer.py --input corpus.jsonl --vocab-size 32000 \\
        --output-prefix tokenizers/sp32k

Writes PREFIX.model and PREFIX.vocab. Special ids: <pad>=0, <unk>=1, <s>=2 (BOS),
</s>=3 (EOS, used as Megatron's EOD), "\\n"=4. Byte fallback is on, so no text is
ever unknown. Same inputs and flags give byte-identical files. Inputs are .jsonl
(field --json-keys, default text), .jsonl.gz or .txt (blank-line-separated
documents); several files, directories or globs may be given.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from patch_megatron.data.input_documents import (  # noqa: E402
    BadRecordError, expand_inputs, input_format, iter_raw_records, parse_record)
from patch_megatron.data.sentencepiece_training import train_sentencepiece  # noqa: E402


def iter_texts(files, json_keys, skip_bad_lines):
    """Document texts of all files; bad records raise unless skipped."""
    for path in files:
        fmt = input_format(path)
        for record in iter_raw_records(path):
            try:
                fields = parse_record(record, fmt, json_keys)
            except BadRecordError:
                if skip_bad_lines:
                    continue
                raise
            for value in fields.values():
                yield value if isinstance(value, str) else "\n".join(value)


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a SentencePiece tokenizer.")
    parser.add_argument("--input", nargs="+", required=True,
                        help=".jsonl/.jsonl.gz/.txt files, directories or globs")
    parser.add_argument("--json-keys", nargs="+", default=["text"],
                        help="JSON fields holding text (default: text)")
    parser.add_argument("--output-prefix", required=True,
                        help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--max-sentences", type=int, default=2_000_000,
                        help="cap on training lines, sampled uniformly with --seed "
                             "(0: no cap)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false",
                        help="turn byte fallback off (unknown characters become <unk>)")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip malformed records instead of stopping")
    parser.add_argument("--log-interval", type=int, default=100_000,
                        help="print a progress line every N lines read")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        files = expand_inputs(args.input)
        directory = os.path.dirname(os.path.abspath(args.output_prefix))
        os.makedirs(directory, exist_ok=True)
        summary = train_sentencepiece(
            iter_texts(files, args.json_keys, args.skip_bad_lines), args.output_prefix,
            args.vocab_size, args.model_type, args.max_sentences or None, args.seed,
            args.character_coverage, args.byte_fallback, args.log_interval)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"trained on {summary.sentences_used} of {summary.sentences_seen} lines from "
          f"{len(files)} file(s) in {summary.seconds:.1f}s; wrote {summary.model_path} and "
          f"{summary.vocab_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
