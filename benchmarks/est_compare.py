"""Token-only vs EST vs patch-level vs patch-level + EST at equal data (CPU scale).

    python benchmarks/est_compare.py [--train-tokens 400000] [--hidden-size 128] ...

Every run reads the same token stream (bytes of the builtin corpus, vocabulary
256) in the same order and the same number of tokens; held-out NLL is the
token-level NLL of the final model on the same held-out windows. FLOPs are
the matmul FLOPs of patch_megatron.flops for the subnetwork that really ran
each step; wall-clock is measured around the training steps only.

Patch-level runs: the first λ of the data in patch stage (K tokens per
position, same tokens per step, so K times fewer samples per step), then a
token stage on the rest, initialised from the patch-stage weights with a fresh
optimizer and schedule (docs/method.md §1). EST runs use --est-* flags of
pretrain_patch_gpt.py (defaults of patch_megatron.est), each stage of a
patch run getting its own EST schedule unless --est-stages says otherwise.
The model is megatron-core's (PatchGPTModel with EST layers) on one process;
the loop is a plain AdamW loop so that the four runs fit in minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch
from patch_megatron.llama_recipe import LLAMA_ARCHITECTURE

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def byte_stream(max_bytes: int) -> torch.Tensor:
    from patch_megatron.data.builtin_corpus import build_builtin_corpus

    with tempfile.TemporaryDirectory() as tmp:
        corpus = build_builtin_corpus(os.path.join(tmp, "corpus.jsonl"), max_bytes=max_bytes)
        with open(corpus.path, encoding="utf-8") as lines:
            text = "\n".join(json.loads(line)["text"] for line in lines)
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def train_stage(model, stream, start, tokens, *, K, T, tokens_per_step, args, est_config, shape):
    """One stage over stream[start : start + tokens]; returns (FLOPs, seconds, steps)."""
    from patch_megatron import flops
    from patch_megatron.est.control import SubnetworkTraining
    from patch_megatron.est.sampler import Layout
    from patch_megatron.est.schedule import ESTConfig

    samples_per_step = tokens_per_step // (K * T)
    steps = tokens // tokens_per_step
    control = SubnetworkTraining(est_config, shape, Layout(), max(steps, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=0.1)
    total_flops = seconds = 0.0
    model.train()
    for step in range(steps):
        offset = start + step * tokens_per_step
        window = stream[offset: offset + tokens_per_step + K]
        # sample i: tokens [i*K*T, (i+1)*K*T); its labels are shifted by K (next patch's tokens)
        tokens_in = window[:-K].view(samples_per_step, K * T)
        labels = window[K:].view(samples_per_step, K * T)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, args.lr, max(1, steps // 20))
        started = time.perf_counter()
        kept = control.set_step([model], step + 1) if est_config.enabled else flops.FULL_MODEL
        loss = model(tokens_in, labels=labels).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        seconds += time.perf_counter() - started
        total_flops += flops.training_flops_per_iteration(shape, T, samples_per_step, K, kept)
    return total_flops, seconds, steps


@torch.no_grad()
def heldout_nll(model, heldout, T) -> float:
    model.eval()
    n = (heldout.numel() - 1) // T
    x = heldout[: n * T].view(n, T)
    y = heldout[1: n * T + 1].view(n, T)
    total = 0.0
    for i in range(0, n, 32):
        total += float(model(x[i:i + 32], labels=y[i:i + 32]).sum())
    model.train()
    return total / (n * T)


def run(name, stream, heldout, args, *, patch: bool, est_stages: tuple[str, ...]):
    from patch_megatron import flops, parallel
    from patch_megatron.est.control import SubnetworkTraining
    from patch_megatron.est.sampler import Layout
    from patch_megatron.est.schedule import ESTConfig
    from patch_megatron.est.spec import subnetwork_block_spec
    from patch_megatron.model.config import PatchGPTConfig
    from patch_megatron.model.patch_gpt import build_model

    parallel.set_seed(args.seed)  # same initial weights in every run
    base = dict(num_layers=args.num_layers, hidden_size=args.hidden_size,
                num_attention_heads=args.num_attention_heads, vocab_size=256, seq_length=args.seq_length,
                num_query_groups=args.num_query_groups, **LLAMA_ARCHITECTURE)
    shape = PatchGPTConfig(**base).shape
    est_on = ESTConfig(enabled=True, seed=args.seed, **args.est_schedule)
    est_off = ESTConfig(enabled=False)
    tokens_per_step = args.batch_size * args.seq_length
    total_tokens = args.train_tokens // tokens_per_step * tokens_per_step
    stages = [("token", 1, total_tokens)]
    if patch:
        patch_tokens = round(args.patch_fraction * total_tokens) // (tokens_per_step * args.patch_size) \
            * (tokens_per_step * args.patch_size)
        stages = [("patch", args.patch_size, patch_tokens), ("token", 1, total_tokens - patch_tokens)]
    weights, used_flops, seconds, start = None, 0.0, 0.0, 0
    for stage, K, tokens in stages:
        model = build_model(PatchGPTConfig(**base, patch_size=K), layer_spec=subnetwork_block_spec)
        if weights is not None:
            model.load_state_dict(weights)
        est_config = est_on if stage in est_stages else est_off
        f, s, _ = train_stage(model, stream, start, tokens, K=K, T=args.seq_length,
                              tokens_per_step=tokens_per_step * K if stage == "patch" else tokens_per_step,
                              args=args, est_config=est_config, shape=shape)
        used_flops += f
        seconds += s
        start += tokens
        weights = model.state_dict()
    token_model = build_model(PatchGPTConfig(**base, patch_size=1), layer_spec=subnetwork_block_spec)
    token_model.load_state_dict(weights)
    nll = heldout_nll(token_model, heldout, args.seq_length)
    return dict(run=name, tokens=start, flops=used_flops, seconds=seconds, heldout_nll=nll)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-tokens", type=int, default=400_000)
    p.add_argument("--heldout-tokens", type=int, default=32_768)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--num-query-groups", type=int, default=None)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="token-stage samples per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--patch-fraction", type=float, default=2 / 3)
    p.add_argument("--est-stages", default="patch,token",
                   help="stages of the patch run that use EST (comma-separated)")
    p.add_argument("--runs", default="token,est,patch,patch+est")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results here")
    from patch_megatron.est.arguments import add_est_args, est_config_from_args

    add_est_args(p)
    args = p.parse_args(argv)
    args.est = True
    schedule = est_config_from_args(args)
    args.est_schedule = dict(stage_ends=schedule.stage_ends, layer_rates=schedule.layer_rates,
                             head_rates=schedule.head_rates, mlp_rates=schedule.mlp_rates,
                             gqa_sampling=schedule.gqa_sampling)
    torch.set_num_threads(args.threads)

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from distributed_harness import init_world_of_one

    init_world_of_one(args.seed)
    stream = byte_stream(max_bytes=args.train_tokens + args.heldout_tokens + 200_000)
    if stream.numel() < args.train_tokens + args.heldout_tokens + 64:
        raise SystemExit(f"the builtin corpus has {stream.numel()} bytes; lower --train-tokens")
    heldout = stream[-args.heldout_tokens:]
    print(schedule.describe(), flush=True)
    est_stages = tuple(s for s in args.est_stages.split(",") if s)
    plans = {"token": dict(patch=False, est_stages=()), "est": dict(patch=False, est_stages=("token",)),
             "patch": dict(patch=True, est_stages=()), "patch+est": dict(patch=True, est_stages=est_stages)}
    # One short throwaway run first: one-time start-up costs stay out of the first timed run.
    run("warm-up", stream, heldout, argparse.Namespace(**{**vars(args), "train_tokens": 4 * args.batch_size
                                                        * args.seq_length * args.patch_size}),
        patch=True, est_stages=("patch", "token"))
    results = []
    for name in args.runs.split(","):
        result = run(name, stream, heldout, args, **plans[name])
        results.append(result)
        print(json.dumps(result), flush=True)
    ref = next((r for r in results if r["run"] == "token"), results[0])
    print(f"\n| run | tokens | held-out NLL | FLOPs | FLOPs vs token-only | wall-clock s | wall vs token-only |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r['tokens']} | {r['heldout_nll']:.4f} | {r['flops']:.3e} | "
              f"{r['flops'] / ref['flops']:.3f} | {r['seconds']:.1f} | {r['seconds'] / ref['seconds']:.3f} |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(dict(args={k: v for k, v in vars(args).items() if k != "est_schedule"} | args.est_schedule,
                           results=results), out, indent=1, default=str)


if __name__ == "__main__":
    main()
