"""Training throughput of the token stage vs the patch stage (K=2, 4, 8) through the real loop.

Each configuration runs ``pretrain_patch_gpt.py --mock-data`` as its own
process with the same model, the same T (model positions) and the same tokens
per micro-batch and per step; tokens/s, TFLOP/s per device and MFU are the
loop's own log figures averaged after the first logged interval (warm-up).

    python benchmarks/throughput.py                       # CPU-sized default
    python benchmarks/throughput.py --num-layers 24 --hidden-size 1024 --num-attention-heads 16 \\
        --ffn-hidden-size 2752 --seq-length 2048 --micro-batch-tokens 16384 --bf16   # the paper's 370M on a GPU
"""

import argparse
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {"tokens/s": r"tokens per second: ([\d.]+)", "TFLOP/s": r"\(TFLOP/s\): ([\d.]+)",
          "MFU %": r"MFU: ([\d.]+)%"}


def run(args, K):
    tokens_per_sample = K * args.seq_length
    mbs = args.micro_batch_tokens // tokens_per_sample
    if mbs < 1 or args.micro_batch_tokens % tokens_per_sample:
        sys.exit(f"--micro-batch-tokens {args.micro_batch_tokens} is not a multiple of K*T = {tokens_per_sample}")
    cmd = [sys.executable, os.path.join(REPO, "pretrain_patch_gpt.py"), "--mock-data", "--vocab-size", str(args.vocab_size),
           "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
           "--num-attention-heads", str(args.num_attention_heads), "--ffn-hidden-size", str(args.ffn_hidden_size),
           "--seq-length", str(args.seq_length), "--untie-embeddings-and-output-weights",
           "--micro-batch-size", str(mbs), "--global-batch-size", str(mbs),
           "--train-iters", str(args.iters), "--log-interval", str(args.log_interval), "--eval-iters", "0",
           "--patch-size", str(K), "--patch-data-fraction", "0.667" if K > 1 else "0"]
    if args.bf16:
        cmd.append("--bf16")
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode:
        sys.exit(out.stdout[-2000:] + out.stderr[-2000:])
    lines = [l for l in out.stdout.splitlines() if "tokens per second" in l][1:]  # drop warm-up
    result = {}
    for name, pattern in FIELDS.items():
        values = [float(m.group(1)) for l in lines if (m := re.search(pattern, l))]
        result[name] = sum(values) / len(values) if values else float("nan")
    device = "GPU" if "GPU (NCCL)" in out.stdout else "CPU"
    return device, result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--ffn-hidden-size", type=int, default=704)
    p.add_argument("--seq-length", type=int, default=128, help="T, the same in every stage")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--micro-batch-tokens", type=int, default=8192)
    p.add_argument("--patch-sizes", default="2,4,8")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()
    rows = []
    for K in [1] + [int(k) for k in args.patch_sizes.split(",")]:
        device, r = run(args, K)
        rows.append((K, r))
        print(f"K={K} done on {device}", flush=True)
    base = rows[0][1]["tokens/s"]
    print(f"\nconfig: {args.num_layers} layers, hidden {args.hidden_size}, T={args.seq_length}, "
          f"vocab {args.vocab_size}, {args.micro_batch_tokens} tokens per micro-batch and step, device {device}")
    print(f"{'stage':<14}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU %':>8}{'x token':>9}{'/ K':>7}")
    for K, r in rows:
        ratio = r["tokens/s"] / base
        print(f"{'token' if K == 1 else f'patch K={K}':<14}{r['tokens/s']:>12.0f}{r['TFLOP/s']:>10.3f}"
              f"{r['MFU %']:>8.1f}{ratio:>9.2f}{ratio / K:>7.2f}")


if __name__ == "__main__":
    main()
