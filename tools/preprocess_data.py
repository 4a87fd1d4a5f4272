"""Tokenize raw text into megatron-core .bin/.idx files (Megatron-LM compatible).

Example:
    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model sp.model \\
        --workers 2 --append-eod

Writes PREFIX_{key}_document.bin/.idx (PREFIX_{key}_sentence with --split-sentences) for each
--json-keys key, byte-identical to Megatron-LM's tools/preprocess_data.py for the same input
and flags (--keep-newlines aside: see patch_megatron/data/sentence_splitting.py). Inputs:
.jsonl, .jsonl.gz, .json, .txt (one document per blank-line-separated block),
directories and globs; several may be given. A malformed JSON line, a missing
key, invalid UTF-8 or an empty document stops the run with its file and line;
--skip-bad-lines skips and counts them instead. Outputs appear only complete.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from patch_megatron.data.input_documents import BadRecordError  # noqa: E402
from patch_megatron.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from patch_megatron.data.tokenizers import add_tokenizer_args  # noqa: E402


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Tokenize text into megatron .bin/.idx.")
    add_tokenizer_args(parser)
    group = parser.add_argument_group(title="input data")
    group.add_argument("--input", nargs="+", required=True,
                       help=".jsonl/.jsonl.gz/.txt files, directories or globs")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="space separated JSON keys to tokenize (default: text)")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="skip (and count) malformed, keyless, non-UTF-8 or empty "
                            "documents instead of stopping")
    group = parser.add_argument_group(title="tokenization process")
    group.add_argument("--append-eod", action="store_true",
                       help="append the tokenizer's EOD id to every document")
    group.add_argument("--split-sentences", action="store_true",
                       help="cut each document into sentences with NLTK's Punkt model (pip "
                            "install nltk; python -m nltk.downloader punkt_tab) and write one "
                            "sequence per sentence")
    group.add_argument("--keep-newlines", action="store_true",
                       help="with --split-sentences: keep the whitespace between sentences, at "
                            "the end of each")
    group.add_argument("--lang", default="english",
                       help="with --split-sentences: the Punkt model's language")
    group = parser.add_argument_group(title="output data")
    group.add_argument("--output-prefix", required=True,
                       help="writes OUTPUT_PREFIX_{key}_document.bin/.idx (_sentence with "
                            "--split-sentences)")
    group = parser.add_argument_group(title="runtime")
    group.add_argument("--workers", type=int, required=True,
                       help="tokenizer worker processes (0: tokenize in the main process)")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="documents between progress lines")
    group.add_argument("--partitions", type=int, default=1,
                       help="accepted without effect: --workers parallelises, and the output "
                            "keeps the input's order (Megatron-LM's --keep-sequential-samples)")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="accepted without effect: the output always keeps the input's order")
    args = parser.parse_args(argv)
    if not args.split_sentences and (args.keep_newlines or args.lang != "english"):
        parser.error("--keep-newlines and --lang choose how --split-sentences splits: add "
                     "--split-sentences, or drop them")
    if args.partitions < 1:
        parser.error("--partitions must be >= 1")
    return args


def main(argv=None) -> int:
    from patch_megatron.model.spec import silence_fallback_warnings

    silence_fallback_warnings()
    args = get_args(argv)
    config = PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
        vocab_size=args.vocab_size, vocab_file=args.vocab_file, merge_file=args.merge_file,
        json_keys=args.json_keys, append_eod=args.append_eod,
        workers=args.workers, log_interval=args.log_interval,
        skip_bad_lines=args.skip_bad_lines, split_sentences=args.split_sentences,
        lang=args.lang, keep_newlines=args.keep_newlines, tiktoken_pattern=args.tiktoken_pattern,
        tiktoken_num_special_tokens=args.tiktoken_num_special_tokens)
    try:
        summary = preprocess(config)
    except BadRecordError as err:
        print(f"error: {err}\nFix the record, or pass --skip-bad-lines to skip such "
              f"records. No output was written.", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no output was written.", file=sys.stderr)
        return 130
    print(summary.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
