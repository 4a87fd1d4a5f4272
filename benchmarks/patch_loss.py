"""Fused patch loss vs K calls of megatron's cross-entropy vs one next-token cross-entropy.

Forward+backward time and peak memory above the logits themselves, for one
vocabulary shard (TP=1). Each variant runs in its own process so peak RSS
(CPU) or the CUDA allocator's peak (GPU) belongs to it alone.

    python benchmarks/patch_loss.py [--vocab 32000 --positions 2048 --batch 1 --patch-size 4]
"""

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = ("single_ce", "fused", "k_calls")


def _measure(args):
    import os

    import psutil
    import torch

    from patch_megatron import cpu_mode, parallel

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_PORT=str(29600 + os.getpid() % 1000))
    parallel.initialize(parallel.ParallelConfig(cpu=None), seed=0)
    from megatron.core import tensor_parallel

    from patch_megatron.model.patch_loss import vocab_parallel_patch_cross_entropy

    cuda = not cpu_mode.is_installed()
    device = "cuda" if cuda else "cpu"
    K, s, b, V = args.patch_size, args.positions, args.batch, args.vocab
    g = torch.Generator(device=device).manual_seed(0)
    base_logits = torch.randn(s, b, V, device=device, generator=g)
    targets = torch.randint(0, V, (s, b, K), device=device, generator=g)

    def step():
        logits = base_logits.clone().requires_grad_()  # stands for the output layer's result
        if args.variant == "single_ce":
            loss = tensor_parallel.vocab_parallel_cross_entropy(logits, targets[..., 0])
        elif args.variant == "fused":
            loss = vocab_parallel_patch_cross_entropy(logits, targets)
        else:  # what a direct port does: K separate cross-entropies, each needing its own logits
            loss = torch.stack(
                [tensor_parallel.vocab_parallel_cross_entropy(logits.clone(), targets[..., k]) for k in range(K)],
                dim=-1,
            )
        loss.mean().backward()

    step()  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    for _ in range(args.repeats):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.repeats
    if cuda:
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps(dict(variant=args.variant, device=device, seconds=seconds, peak_bytes=peak)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--positions", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return _measure(args)

    rows = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "variant"
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])
    logits_mb = args.positions * args.batch * args.vocab * 4 / 2**20
    base = rows["single_ce"]
    print(f"device {base['device']}, vocab {args.vocab}, {args.positions}x{args.batch} positions, "
          f"K={args.patch_size}; logits {logits_mb:.0f} MiB (fp32); peak = memory above the step's start")
    print(f"{'variant':<12}{'fwd+bwd ms':>12}{'x single':>10}{'peak MiB':>10}{'x single':>10}")
    for variant in VARIANTS:
        r = rows[variant]
        print(f"{variant:<12}{r['seconds'] * 1e3:>12.1f}{r['seconds'] / base['seconds']:>10.2f}"
              f"{r['peak_bytes'] / 2**20:>10.0f}{r['peak_bytes'] / max(base['peak_bytes'], 1):>10.2f}")


if __name__ == "__main__":
    main()
