"""Token-only vs patch-level training at equal data: held-out NLL, FLOPs, wall-clock.

For each token budget D and seed it trains, on the same D tokens of a real
corpus (the Python standard library's docstrings, sources and test suite,
documents shuffled once so the held-out split is representative):

* token-only: D tokens at K=1;
* patch+token: the patch stage (K, first λ·D tokens), the weights-only
  handoff, the token stage (the other (1-λ)·D tokens), as the paper does;
* token stage alone (a control): the same token stage from random weights,
  so "patch+token" minus this is what the patch stage's weights are worth;
* with ``--arms``, also est and patch+token+est: token-only and patch+token
  with Evolving Subnetwork Training (``--est`` and ``--est-args``) in every
  stage, their FLOPs those of the subnetworks that ran, as the loop counts them.

Every run goes through pretrain_patch_gpt.py, and patch+token through
tools/pretrain_two_stage.py, as a user runs them.

Both arms use the same model, optimizer, peak LR, tokens per step and the same
held-out samples (the validation split, evaluated after the last iteration).
It prints held-out token NLL (mean ± std over seeds), FLOPs, wall-clock and the
cost ratio, and writes results.json and loss_vs_compute.png into a folder of
--workdir named after the model and recipe.
Finished runs are reused, so a sweep can be extended a budget at a time.

    python benchmarks/patch_vs_token.py --train-tokens 1000000,4000000 --seeds 1,2,3

Runs go --jobs at a time (default 2), each with its share of the cores;
wall-clock figures are only comparable within one invocation. At a scale
beyond the built-in corpus (on a GPU), point it at your own preprocessed data:

    python benchmarks/patch_vs_token.py --data-path pile_text_document --tokenizer-model tok.model \
        --vocab-size 32000 --num-layers 12 --hidden-size 768 --num-attention-heads 12 \
        --ffn-hidden-size 2048 --seq-length 1024 --global-batch-size 256 --lr 6e-4 \
        --train-tokens 5000000000 --seeds 1 --jobs 1 --extra-args "--bf16 --micro-batch-size 16"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from patch_megatron.model.shape import llama_shape, padded_vocab_size  # noqa: E402
from patch_megatron import flops  # noqa: E402
from patch_megatron.training.log_reading import (  # noqa: E402
    est_flops, runner_seconds, runner_sections, tokens_per_second, validation_curve)
from patch_megatron.llama_recipe import RECIPE_FLAGS  # noqa: E402

LATEST = "latest_checkpointed_iteration.txt"
ARMS = ("token-only", "patch+token", "token stage alone", "est", "patch+token+est")
DEFAULT_ARMS = "token-only,patch+token,token stage alone"
# EST's arms: the same runs with --est (and --est-args) in every stage.
EST_ARMS = {"est": "token-only", "patch+token+est": "patch+token"}
VALID_PERCENT = 2


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=os.path.join(REPO, "runs", "patch_vs_token"))
    p.add_argument("--train-tokens", default="1000000,4000000",
                   help="comma-separated token budgets D (each arm trains on D tokens)")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--patch-data-fraction", type=float, default=2 / 3)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-attention-heads", type=int, default=2)
    p.add_argument("--ffn-hidden-size", type=int, default=176)
    p.add_argument("--seq-length", type=int, default=128, help="T: tokens, or patches in the patch stage")
    p.add_argument("--global-batch-size", type=int, default=32,
                   help="token-stage samples per step; the patch stage takes this / K (equal tokens per step)")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr", type=float, default=0.0, help="cosine floor (the paper decays to 0)")
    p.add_argument("--lr-warmup-fraction", type=float, default=0.02)
    p.add_argument("--evals", type=int, default=8, help="validations per run (plus one at the end)")
    p.add_argument("--eval-samples", type=int, default=512, help="held-out samples per validation")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each gets cores/jobs threads)")
    p.add_argument("--data-path", default=None,
                   help="an existing megatron data prefix to use instead of the built-in corpus "
                        "(with --tokenizer-model; its vocabulary must be --vocab-size)")
    p.add_argument("--tokenizer-model", default=None, help="the SentencePiece model of --data-path")
    p.add_argument("--extra-args", default="",
                   help="more pretrain_patch_gpt.py flags for every stage, e.g. '--bf16' on a GPU")
    p.add_argument("--arms", default=DEFAULT_ARMS,
                   help=f"comma-separated, of: {', '.join(ARMS)} (the EST arms are token-only and "
                        "patch+token with --est in every stage)")
    p.add_argument("--est-args", default="",
                   help="pretrain_patch_gpt.py's --est-* flags for the EST arms (default: its "
                        "default schedule)")
    args = p.parse_args()
    args.budgets = [int(float(x)) for x in args.train_tokens.split(",")]
    args.seed_list = [int(x) for x in args.seeds.split(",")]
    args.arm_list = [a for a in args.arms.split(",") if a]
    unknown = [a for a in args.arm_list if a not in ARMS]
    if unknown or not args.arm_list:
        p.error(f"--arms {args.arms!r}: use some of {', '.join(ARMS)}")
    if not {"token-only"} <= set(args.arm_list):
        p.error("--arms needs token-only: the costs are relative to it")
    if (args.data_path is None) != (args.tokenizer_model is None):
        p.error("--data-path and --tokenizer-model go together")
    if args.global_batch_size % args.patch_size:
        p.error(f"--global-batch-size {args.global_batch_size} must be divisible by "
                f"--patch-size {args.patch_size} (the patch stage runs B/K samples of K*T tokens)")
    return args


def run(command, log_path, threads):
    """Run one process to completion, its output into ``log_path``; fail loudly."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads)}
    with open(log_path, "w") as log:
        code = subprocess.call(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    if code:
        tail = open(log_path).read()[-3000:]
        raise RuntimeError(f"{' '.join(command[:3])} ... failed (exit {code}); log {log_path}:\n{tail}")


def prepare_data(args):
    """Corpus -> SentencePiece model -> indexed files, each reused when present."""
    if args.data_path is not None:
        return args.data_path, args.tokenizer_model
    py, data = sys.executable, os.path.join(args.workdir, "data")
    os.makedirs(data, exist_ok=True)
    corpus, tokenizer = os.path.join(data, "corpus.jsonl"), os.path.join(data, "tokenizer")
    prefix = os.path.join(data, "corpus_text_document")
    if not os.path.exists(corpus):
        ordered = corpus + ".ordered"
        run([py, "-m", "patch_megatron.data.builtin_corpus", ordered, "--max-bytes", "0",
             "--include-sources", "--include-tests"], corpus + ".log", 2)
        lines = open(ordered, encoding="utf-8").readlines()
        random.Random(0).shuffle(lines)  # so the held-out documents are like the training ones
        with open(corpus + ".tmp", "w", encoding="utf-8") as out:
            out.writelines(lines)
        os.replace(corpus + ".tmp", corpus)
        os.remove(ordered)
    if not os.path.exists(tokenizer + ".model"):
        run([py, "tools/train_tokenizer.py", "--input", corpus, "--vocab-size", str(args.vocab_size),
             "--output-prefix", tokenizer], tokenizer + ".log", 2)
    if not os.path.exists(prefix + ".idx"):
        run([py, "tools/preprocess_data.py", "--input", corpus, "--output-prefix", prefix[: -len("_text_document")],
             "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", tokenizer + ".model",
             "--append-eod", "--workers", "2"], prefix + ".log", 2)
    return prefix, tokenizer + ".model"


def corpus_train_tokens(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)  # keep it alive: its lengths are a view of its memory map
    lengths = dataset.sequence_lengths
    return int(lengths[: len(lengths) * (100 - VALID_PERCENT) // 100].sum())


def pretrain_flags(args, data, budget, seed, micro_batch_size, est=False):
    """Every arm's and stage's flags but for the run's length, K, λ, batch and directories."""
    T, B = args.seq_length, args.global_batch_size
    steps = budget // (B * T)  # whole-run steps at equal tokens per step
    return [
        "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
        "--num-attention-heads", str(args.num_attention_heads), "--ffn-hidden-size", str(args.ffn_hidden_size),
        "--seq-length", str(T), "--untie-embeddings-and-output-weights", "--make-vocab-size-divisible-by", "128",
        "--data-path", data[0], "--split", f"{100 - VALID_PERCENT},{VALID_PERCENT},0",
        "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", data[1],
        "--micro-batch-size", str(micro_batch_size),
        "--lr", str(args.lr), "--min-lr", str(args.min_lr), "--lr-warmup-fraction", str(args.lr_warmup_fraction),
        "--log-interval", str(max(1, steps // 20)), "--eval-interval", str(max(1, steps // args.evals)),
        "--eval-iters", str(max(1, args.eval_samples // B)), "--seed", str(seed),
        *RECIPE_FLAGS, *args.extra_args.split(), *(["--est", *args.est_args.split()] if est else []),
    ]


def token_run_command(args, data, budget, seed, *, fraction, save, est=False):
    """pretrain_patch_gpt.py at K=1: token-only training, or the token stage alone."""
    B = args.global_batch_size
    return [sys.executable, "pretrain_patch_gpt.py", *pretrain_flags(args, data, budget, seed, B, est),
            "--train-tokens", str(budget), "--patch-size", "1", "--patch-data-fraction", f"{fraction:.6f}",
            "--global-batch-size", str(B), "--save", save]


def two_stage_command(args, data, budget, seed, *, save, est=False):
    """tools/pretrain_two_stage.py: patch stage, handoff, token stage (micro-batches of B/K samples)."""
    B, K = args.global_batch_size, args.patch_size
    return [sys.executable, "tools/pretrain_two_stage.py", "--train-tokens", str(budget),
            "--patch-size", str(K), "--patch-data-fraction", f"{args.patch_data_fraction:.6f}",
            "--global-batch-size", str(B), "--save", save,
            *pretrain_flags(args, data, budget, seed, B // K, est)]


def train_arm(args, data, budget, seed, arm, threads):
    """One arm of one (budget, seed): its processes in order; returns its figures."""
    out = os.path.join(run_root(args), f"D{budget}", f"seed{seed}", arm)
    result_path = os.path.join(out, "result.json")
    if os.path.exists(result_path):
        return json.load(open(result_path))
    os.makedirs(out, exist_ok=True)
    K, lam = args.patch_size, args.patch_data_fraction
    result = {"budget": budget, "seed": seed, "arm": arm, "stages": []}
    start = time.time()
    est, kind = arm in EST_ARMS, EST_ARMS.get(arm, arm)
    if kind == "patch+token":
        log = os.path.join(out, "two_stage.log")
        run(two_stage_command(args, data, budget, seed, save=out, est=est), log, threads)
        text = open(log).read()
        sections, seconds = runner_sections(text), runner_seconds(text)
        for name, stage_k in (("patch stage", K), ("handoff", None), ("token stage", 1)):
            entry = {"name": name, "seconds": seconds[name]}
            if stage_k is not None:
                ckpt = os.path.join(out, "patch" if stage_k > 1 else "token")
                iterations = int(open(os.path.join(ckpt, LATEST)).read())
                entry.update(iterations=iterations,
                             flops=trained_flops(sections[name], iterations * step_flops(args, stage_k), est),
                             curve=validation_curve(sections[name]),
                             tokens_per_second=tokens_per_second(sections[name]))
            result["stages"].append(entry)
    else:
        name, fraction = ("token-only", 0.0) if kind == "token-only" else ("token stage", lam)
        ckpt, log = os.path.join(out, "ckpt"), os.path.join(out, name.replace(" ", "_") + ".log")
        began = time.time()
        run(token_run_command(args, data, budget, seed, fraction=fraction, save=ckpt, est=est), log, threads)
        text = open(log).read()
        iterations = int(open(os.path.join(ckpt, LATEST)).read())
        result["stages"].append({"name": name, "seconds": time.time() - began, "iterations": iterations,
                                 "flops": trained_flops(text, iterations * step_flops(args, 1), est),
                                 "curve": validation_curve(text),
                                 "tokens_per_second": tokens_per_second(text)})
    print(f"  D={budget:,} seed {seed} {arm}: done in {time.time() - start:.0f} s", flush=True)
    trained = [s for s in result["stages"] if "curve" in s]
    result.update(seconds=time.time() - start, flops=sum(s["flops"] for s in trained),
                  heldout_nll=trained[-1]["curve"][-1][1])
    json.dump(result, open(result_path, "w"), indent=1)
    return result


def run_root(args):
    """Runs of one model and recipe share a folder; the data is shared by all."""
    return os.path.join(args.workdir, f"{args.num_layers}L_h{args.hidden_size}_T{args.seq_length}_"
                                      f"B{args.global_batch_size}_K{args.patch_size}_lam{args.patch_data_fraction:.3f}")


def model_shape(args):
    return llama_shape(num_layers=args.num_layers, hidden_size=args.hidden_size,
                       num_attention_heads=args.num_attention_heads,
                       ffn_hidden_size=args.ffn_hidden_size, vocab_size=padded_vocab_size(args.vocab_size))


def step_flops(args, patch_size):
    return flops.training_flops_per_iteration(model_shape(args), args.seq_length, patch_size=patch_size,
                                              global_batch_size=args.global_batch_size // patch_size)


def trained_flops(log_text, full_model_flops, est):
    """A stage's FLOPs: the full model's, or with EST the subnetworks' as the loop counted them."""
    if not est:
        return full_model_flops
    trained, full = est_flops(log_text)
    if abs(full - full_model_flops) > 1e-3 * full_model_flops:  # printed to 4 digits
        raise RuntimeError(f"the loop's full-model FLOPs {full:.4g} differ from this script's "
                           f"{full_model_flops:.4g}: the FLOPs model and the benchmark disagree")
    return trained


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def report(args, results):
    arms = args.arm_list
    n_params = model_shape(args).parameter_count()
    print(f"\nmodel: {args.num_layers} layers, hidden {args.hidden_size}, ffn {args.ffn_hidden_size}, "
          f"vocab {args.vocab_size} ({n_params / 1e6:.2f}M parameters, embeddings included); T={args.seq_length}, "
          f"{args.global_batch_size * args.seq_length} tokens per step; K={args.patch_size}, "
          f"λ={args.patch_data_fraction:.3f}; seeds {args.seeds}")
    print(f"{'D tokens':>11}{'tok/param':>10}  {'arm':<18}{'held-out NLL':>18}{'FLOPs':>10}{'cost':>6}"
          f"{'wall s':>8}")
    summary = []
    for budget in args.budgets:
        rows = {arm: [r for r in results if r["budget"] == budget and r["arm"] == arm] for arm in arms}
        base_flops = statistics.mean(r["flops"] for r in rows["token-only"])
        entry = {"budget": budget, "tokens_per_parameter": budget / n_params}
        for arm in arms:
            nll_mean, nll_std = mean_std([r["heldout_nll"] for r in rows[arm]])
            fl = statistics.mean(r["flops"] for r in rows[arm])
            secs = statistics.mean(r["seconds"] for r in rows[arm])
            entry[arm] = {"nll_mean": nll_mean, "nll_std": nll_std, "flops": fl, "cost": fl / base_flops,
                          "seconds": secs, "per_seed": {r["seed"]: r["heldout_nll"] for r in rows[arm]}}
            print(f"{budget:>11,}{budget / n_params:>10.1f}  {arm:<18}{nll_mean:>10.3f} ± {nll_std:<5.3f}"
                  f"{fl:>10.2e}{fl / base_flops:>6.2f}{secs:>8.0f}")
        for name, other in (("nll_gap", "token-only"), ("patch_stage_worth", "token stage alone")):
            if "patch+token" not in arms or other not in arms:
                continue
            diffs = [entry["patch+token"]["per_seed"][s] - entry[other]["per_seed"][s] for s in args.seed_list]
            entry[name], entry[name + "_std"] = mean_std(diffs)
            print(f"{'':>23}patch+token - {other}: {entry[name]:+.3f} ± {entry[name + '_std']:.3f} nats "
                  "(paired by seed)")
        summary.append(entry)
    json.dump({"config": vars(args), "parameters": n_params, "summary": summary, "runs": results},
              open(os.path.join(run_root(args), "results.json"), "w"), indent=1, default=str)
    plot(args, results)


def plot(args, results):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, budget in enumerate(args.budgets):
        for r in (r for r in results if r["budget"] == budget):
            x0, xs, ys = 0.0, [], []
            for stage in (s for s in r["stages"] if "curve" in s):
                per_step = stage["flops"] / stage["iterations"]
                xs += [x0 + it * per_step for it, _ in stage["curve"]]
                ys += [v for _, v in stage["curve"]]
                x0 += stage["flops"]
            style = {"token-only": "-", "patch+token": "--", "token stage alone": ":", "est": "-.",
                     "patch+token+est": (0, (5, 1, 1, 1))}[r["arm"]]
            label = f"D={budget / 1e6:g}M {r['arm']}" if r["seed"] == args.seed_list[0] else None
            ax.plot(xs, ys, linestyle=style, color=colours[i % len(colours)], lw=1, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("held-out token NLL")
    ax.set_title(f"token-only (solid), patch K={args.patch_size} λ={args.patch_data_fraction:.2f} + token (dashed),\n"
                 "token stage alone (dotted), EST (dash-dot)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(run_root(args), "loss_vs_compute.png")
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main():
    args = parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    data = prepare_data(args)
    available = corpus_train_tokens(data[0])
    if max(args.budgets) > available:
        sys.exit(f"--train-tokens {max(args.budgets):,} exceeds the {available:,} training tokens of the corpus: "
                 "both arms would repeat data. Lower --train-tokens.")
    jobs = [(b, s, arm) for b in args.budgets for s in args.seed_list for arm in args.arm_list]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    print(f"{len(jobs)} runs, {args.jobs} at a time, {threads} thread(s) each; "
          f"corpus: {available:,} training tokens", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: train_arm(args, data, *job, threads), jobs))
    report(args, results)


if __name__ == "__main__":
    main()
