"""The whole workflow on a small real corpus, on CPU, in minutes.

    python examples/quickstart.py [--workdir runs/quickstart] [--train-tokens 1000000]

Steps (each a real tool of this repository, run as its own process):
 1. corpus: the Python standard library's own docstrings, topics and sources
 2. tokenizer: SentencePiece BPE (tools/train_tokenizer.py)
 3. preprocess: megatron indexed files (tools/preprocess_data.py)
 4. two-stage run (tools/pretrain_two_stage.py): the patch stage, K=4 on the first λ=2/3
    of the training tokens; the weights-only handoff; the token stage on the rest
 5. baseline: token-only training on the same data and token budget
 6. export: Hugging Face LlamaForCausalLM (tools/convert_to_hf.py)
 7. evaluation: held-out token NLL, FLOPs, wall-clock, and a plot

A step whose output exists is reused, so re-running continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from patch_megatron.training.log_reading import (  # noqa: E402
    runner_seconds, runner_sections, tokens_per_second, validation_curve)
from patch_megatron.llama_recipe import RECIPE_FLAGS  # noqa: E402

MODEL = dict(num_layers=4, hidden_size=128, num_attention_heads=4, ffn_hidden_size=352)
SEQ = 64  # T: tokens in the token stage, patches in the patch stage
TOKENS_PER_STEP = 16 * SEQ  # the same in both stages, as in the paper
K, LAMBDA = 4, 2 / 3
VOCAB = 4000
STEPS = 7


def model_flags(seq=SEQ):
    return ["--num-layers", str(MODEL["num_layers"]), "--hidden-size", str(MODEL["hidden_size"]),
            "--num-attention-heads", str(MODEL["num_attention_heads"]),
            "--ffn-hidden-size", str(MODEL["ffn_hidden_size"]), "--seq-length", str(seq),
            "--untie-embeddings-and-output-weights", "--make-vocab-size-divisible-by", "128",
            *RECIPE_FLAGS]  # the paper's LLaMA recipe, as Megatron-LM flags


class Workflow:
    def __init__(self, workdir, train_tokens):
        self.dir = workdir
        self.train_tokens = train_tokens
        self.timings_path = os.path.join(workdir, "timings.json")
        self.timings = json.load(open(self.timings_path)) if os.path.exists(self.timings_path) else {}
        self.number = 0

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def step(self, name, done, command, log=None):
        """Run ``command`` unless ``done`` exists; record its wall-clock."""
        self.number += 1
        title = f"[{self.number}/{STEPS}] {name}"
        if os.path.exists(done):
            print(f"{title}: done before, reused ({os.path.relpath(done, REPO)})", flush=True)
            return
        print(f"{title} ...", flush=True)
        start = time.time()
        log_file = open(log, "w") if log else None
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        for line in process.stdout:
            if log_file:
                log_file.write(line)
            if _worth_showing(line):
                print("    " + line.rstrip()[:160], flush=True)
        if process.wait() != 0:
            sys.exit(f"{title} failed (exit {process.returncode}); see "
                     f"{log or 'the output above'}. Fix it and re-run: finished steps are reused.")
        if log_file:
            log_file.close()
        self.timings[name] = time.time() - start
        json.dump(self.timings, open(self.timings_path, "w"), indent=1)

    def train_flags(self, data_prefix, tokenizer):
        """Both stages' flags and the baseline's, but for the run's length, K, λ and batch."""
        return ["--data-path", data_prefix, "--split", "98,2,0",
                "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", tokenizer,
                "--micro-batch-size", str(TOKENS_PER_STEP // SEQ // K),
                "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-fraction", "0.05",
                "--log-interval", "20", "--eval-interval", "40", "--eval-iters", "4",
                "--seed", "1234"]


def _worth_showing(line):
    return ("iteration" in line and "/" in line) or "validation" in line or "error" in line.lower() \
        or "Traceback" in line or line.startswith(("summary", "wrote", "Wrote", "[1/3]", "[2/3]", "[3/3]"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=os.path.join(REPO, "runs", "quickstart"))
    p.add_argument("--train-tokens", type=int, default=1_000_000,
                   help="token budget of each compared run (both stages together)")
    p.add_argument("--corpus-bytes", type=int, default=4_000_000)
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    w = Workflow(os.path.abspath(args.workdir), args.train_tokens)
    py = sys.executable
    corpus, tok, data = w.path("corpus.jsonl"), w.path("tokenizer"), w.path("corpus")
    prefix = data + "_text_document"

    w.step("corpus", corpus, [py, "-m", "patch_megatron.data.builtin_corpus", corpus,
                              "--max-bytes", str(args.corpus_bytes), "--include-sources"])
    w.step("tokenizer", tok + ".model", [py, "tools/train_tokenizer.py", "--input", corpus,
                                         "--vocab-size", str(VOCAB), "--output-prefix", tok])
    w.step("preprocess", prefix + ".idx", [py, "tools/preprocess_data.py", "--input", corpus,
                                           "--output-prefix", data, "--tokenizer-type",
                                           "GPTSentencePieceTokenizer", "--tokenizer-model",
                                           tok + ".model", "--append-eod", "--workers", "2"])
    common = w.train_flags(prefix, tok + ".model")
    batch = TOKENS_PER_STEP // SEQ
    latest = "latest_checkpointed_iteration.txt"
    w.step("two-stage run", w.path("token", latest),
           [py, "tools/pretrain_two_stage.py", "--train-tokens", str(args.train_tokens),
            "--patch-size", str(K), "--patch-data-fraction", f"{LAMBDA:.6f}",
            "--global-batch-size", str(batch), "--save", w.dir, *model_flags(), *common],
           log=w.path("two_stage.log"))
    w.step("baseline", w.path("baseline", latest),
           [py, "pretrain_patch_gpt.py", *model_flags(), *common, "--patch-size", "1",
            "--patch-data-fraction", "0", "--global-batch-size", str(batch),
            "--train-tokens", str(args.train_tokens), "--save", w.path("baseline")],
           log=w.path("baseline.log"))
    w.step("export", w.path("hf", "config.json"),
           [py, "tools/convert_to_hf.py", "--load", w.path("token"), "--output", w.path("hf"),
            "--tokenizer-model", tok + ".model"])
    report(w)


def report(w):
    from patch_megatron import flops
    from patch_megatron.model.shape import llama_shape, padded_vocab_size

    print(f"[{STEPS}/{STEPS}] evaluation", flush=True)
    shape = llama_shape(vocab_size=padded_vocab_size(VOCAB), **MODEL)
    per_step = {  # FLOPs of one optimizer step in each stage (same tokens per step)
        "patch": flops.training_flops_per_iteration(shape, SEQ, patch_size=K,
                                                    global_batch_size=TOKENS_PER_STEP // SEQ // K),
        "token": flops.training_flops_per_iteration(shape, SEQ, patch_size=1,
                                                    global_batch_size=TOKENS_PER_STEP // SEQ),
    }
    two_stage_log = open(w.path("two_stage.log")).read()
    stages, seconds = runner_sections(two_stage_log), runner_seconds(two_stage_log)
    baseline_log = open(w.path("baseline.log")).read()
    patch_curve, token_curve = (validation_curve(stages[s]) for s in ("patch stage", "token stage"))
    base_curve = validation_curve(baseline_log)
    patch_iters = int(open(w.path("patch", "latest_checkpointed_iteration.txt")).read())
    token_iters = int(open(w.path("token", "latest_checkpointed_iteration.txt")).read())
    base_iters = int(open(w.path("baseline", "latest_checkpointed_iteration.txt")).read())
    patch_flops = patch_iters * per_step["patch"]
    two_stage_flops = patch_flops + token_iters * per_step["token"]
    base_flops = base_iters * per_step["token"]
    t = w.timings
    rows = [
        ("patch stage (K=4)", None, patch_flops, seconds.get("patch stage"),
         tokens_per_second(stages["patch stage"])),
        ("token stage", token_curve[-1][1], token_iters * per_step["token"],
         seconds.get("token stage"), tokens_per_second(stages["token stage"])),
        ("patch + token (ours)", token_curve[-1][1], two_stage_flops, t["two-stage run"], None),
        ("token-only baseline", base_curve[-1][1], base_flops, t["baseline"],
         tokens_per_second(baseline_log)),
    ]
    print(f"\n{'run':<22}{'held-out NLL':>13}{'PPL':>9}{'FLOPs':>11}{'wall s':>8}{'tokens/s':>10}")
    for name, nll, fl, secs, tps in rows:
        nll_s = f"{nll:13.3f}{math.exp(nll):9.1f}" if nll is not None else f"{'-':>13}{'-':>9}"
        tps_s = f"{tps:10.0f}" if tps is not None else f"{'-':>10}"
        secs_s = f"{secs:8.0f}" if secs is not None else f"{'-':>8}"
        print(f"{name:<22}{nll_s}{fl:11.2e}{secs_s}{tps_s}")
    print(f"\ncost ratio (FLOPs, patch+token / baseline): {two_stage_flops / base_flops:.3f} "
          f"(the paper's λ/K + 1 - λ = {LAMBDA / K + 1 - LAMBDA:.3f})")
    print(f"held-out NLL difference (ours - baseline): {token_curve[-1][1] - base_curve[-1][1]:+.3f} nats; "
          "held-out = the validation split, the same samples for both runs")
    print(f"Hugging Face model: {w.path('hf')}")
    plot(w, patch_curve, token_curve, base_curve, per_step, patch_iters)


def plot(w, patch_curve, token_curve, base_curve, per_step, patch_iters):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    ours = [(i * per_step["patch"], v) for i, v in patch_curve] + \
           [(patch_iters * per_step["patch"] + i * per_step["token"], v) for i, v in token_curve]
    base = [(i * per_step["token"], v) for i, v in base_curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*base), "o-", label="token-only")
    ax.plot(*zip(*ours), "s-", label=f"patch (K={K}, λ=2/3) then token")
    ax.axvline(patch_iters * per_step["patch"], color="grey", ls=":", lw=1)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("held-out token NLL (K=1)")
    ax.legend()
    fig.tight_layout()
    out = w.path("loss_vs_compute.png")
    fig.savefig(out, dpi=120)
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
