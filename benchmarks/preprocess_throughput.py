"""Preprocessing throughput (docs/s, MB/s) for 1 and 2 workers on a few-MB real corpus.

    python benchmarks/preprocess_throughput.py [--mb 8] [--workers 1 2] [--megatron-lm PATH]

Compares tools/preprocess_data.py's engine with a baseline that runs Megatron-LM's
loop as its tools/preprocess_data.py does it (Pool.imap over lines, chunksize 32,
json.loads + tokenize per line in the workers, one add_document per document in
the parent), with the same megatron-core tokenizer and builder, since
megatron.training is not installable from PyPI. With --megatron-lm PATH the
real tool from a Megatron-LM checkout is also timed (wall time, startup included).
Both write identical files; the script checks that. Times exclude imports.
"""

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))
warnings.filterwarnings("ignore")

from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder  # noqa: E402

from patch_megatron.data.builtin_corpus import build_builtin_corpus  # noqa: E402
from patch_megatron.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from patch_megatron.data.sentencepiece_training import train_sentencepiece  # noqa: E402
from patch_megatron.data.tokenizers import build_tokenizer  # noqa: E402

_BASELINE_TOKENIZER = None


def _baseline_init(model):
    global _BASELINE_TOKENIZER
    _BASELINE_TOKENIZER = build_tokenizer("GPTSentencePieceTokenizer", model)


def _baseline_encode(line):
    ids = _BASELINE_TOKENIZER.tokenize(json.loads(line)["text"])
    if ids:
        ids.append(_BASELINE_TOKENIZER.eod)
    return ids, [len(ids)] if ids else [], len(line)


def run_baseline(corpus, model, prefix, workers):
    vocab = build_tokenizer("GPTSentencePieceTokenizer", model).vocab_size
    started = time.time()
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab))
    with open(corpus, encoding="utf-8") as lines, multiprocessing.get_context("fork").Pool(
            workers, initializer=_baseline_init, initargs=(model,)) as pool:
        documents = 0
        for ids, lengths, _ in pool.imap(_baseline_encode, lines, 32):
            builder.add_document(ids, lengths)
            documents += 1
    builder.finalize(prefix + ".idx")
    return documents, time.time() - started


def run_ours(corpus, model, prefix, workers):
    summary = preprocess(PreprocessConfig(
        inputs=[corpus], output_prefix=prefix, tokenizer_type="GPTSentencePieceTokenizer",
        tokenizer_model=model, append_eod=True, workers=workers, log_interval=10**9),
        progress_stream=open(os.devnull, "w"))
    return summary.documents, summary.seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=8.0, help="corpus size in MB")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=2, help="best of N runs")
    parser.add_argument("--megatron-lm", help="a Megatron-LM checkout to time its own tool")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="preprocess_bench_")
    corpus = build_builtin_corpus(os.path.join(work, "corpus.jsonl"), int(args.mb * 1e6),
                                  include_sources=True)
    texts = (json.loads(line)["text"] for line in open(corpus.path, encoding="utf-8"))
    model = train_sentencepiece(texts, os.path.join(work, "sp"), args.vocab_size,
                                progress_every=0).model_path
    size_mb = os.path.getsize(corpus.path) / 1e6
    print(f"corpus: {corpus.documents} documents, {size_mb:.2f} MB (.jsonl), "
          f"vocab {args.vocab_size}, cores {os.cpu_count()}")
    print(f"{'pipeline':<34}{'workers':>8}{'seconds':>9}{'docs/s':>10}{'MB/s':>8}")
    for workers in args.workers:
        outputs = {}
        for name, runner in (("megatron-lm loop (baseline)", run_baseline),
                             ("patch-megatron preprocess", run_ours)):
            prefix = os.path.join(work, f"{name.split()[0]}_{workers}")
            best = min(runner(corpus.path, model, prefix + f"_{r}", workers)[1]
                       for r in range(args.repeats))
            print(f"{name:<34}{workers:>8}{best:>9.2f}{corpus.documents / best:>10.1f}"
                  f"{size_mb / best:>8.2f}")
            written = f"{prefix}_0_text_document" if "patch" in name else f"{prefix}_0"
            outputs[name] = [open(written + s, "rb").read() for s in (".bin", ".idx")]
        identical = len({tuple(v) for v in outputs.values()}) == 1
        print(f"{'':<34}{'':>8} identical output files: {identical}")
        if args.megatron_lm:
            started = time.time()
            subprocess.run([sys.executable, os.path.join(args.megatron_lm, "tools",
                                                         "preprocess_data.py"),
                            "--input", corpus.path, "--output-prefix",
                            os.path.join(work, f"mlm_{workers}"), "--tokenizer-type",
                            "GPTSentencePieceTokenizer", "--tokenizer-model", model,
                            "--workers", str(workers), "--append-eod"],
                           check=True, capture_output=True,
                           env={**os.environ, "PYTHONPATH": args.megatron_lm})
            took = time.time() - started
            print(f"{'Megatron-LM tool (wall, w/ startup)':<34}{workers:>8}{took:>9.2f}"
                  f"{corpus.documents / took:>10.1f}{size_mb / took:>8.2f}")


if __name__ == "__main__":
    main()
