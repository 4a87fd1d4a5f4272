"""Training throughput and peak memory of the token stage vs the patch stage (K=2, 4, 8),
through the real loop.

Each configuration runs ``pretrain_patch_gpt.py --mock-data`` as its own
process with the same model, the same T (model positions) and the same tokens
per micro-batch and per step; tokens/s, TFLOP/s per device and MFU are the
loop's own log figures averaged after the first logged interval (warm-up), and
peak memory is the loop's last logged peak: the allocator's max allocated
memory on a GPU, the process's peak RSS on CPU (which includes the libraries).

    python benchmarks/throughput.py        # GPU: the paper's 370M, bf16; CPU: a small model
    python benchmarks/throughput.py --num-layers 12 --micro-batch-tokens 32768   # override any part
    python benchmarks/throughput.py --patch-sizes 4 --extra-args="--recompute-granularity full \
        --recompute-method uniform --recompute-num-layers 1"   # any pretrain_patch_gpt.py flags
"""

import argparse
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from patch_megatron import parallel  # noqa: E402
from patch_megatron.training import log_reading  # noqa: E402
from patch_megatron.llama_recipe import RECIPE_FLAGS  # noqa: E402

# The paper's 370M (docs/method.md §1) at 16384 tokens per micro-batch: 8 x 2048 tokens in the token
# stage, 2 x 4 x 2048 at K=4; activations, logits and optimizer state fit an 80 GB H100 in bf16.
GPU_DEFAULTS = dict(num_layers=24, hidden_size=1024, ffn_hidden_size=2752, num_attention_heads=16,
                    seq_length=2048, vocab_size=32000, micro_batch_tokens=16384, bf16=True)
# Small enough for a 2-core CPU to run every stage in a few minutes, fp32 (bf16 needs CUDA).
CPU_DEFAULTS = dict(num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4,
                    seq_length=128, vocab_size=32000, micro_batch_tokens=8192, bf16=False)

# Column -> the log line's field (patch_megatron.training.log_reading parses the lines).
RATES = {"tokens/s": "tokens per second", "TFLOP/s": "throughput per device (TFLOP/s)",
         "MFU %": "MFU"}
# The first memory field the loop logs on each device: what the "peak MiB" column shows.
PEAK_MEMORY = {"GPU": "peak allocated GPU memory (MiB)", "CPU": "peak RSS of the process (MiB)"}
PEAK_MEMORY_MEANING = {"GPU": "torch.cuda.max_memory_allocated", "CPU": "peak RSS of the process"}


def stage_command(args, K):
    tokens_per_sample = K * args.seq_length
    mbs = args.micro_batch_tokens // tokens_per_sample
    if mbs < 1 or args.micro_batch_tokens % tokens_per_sample:
        sys.exit(f"--micro-batch-tokens {args.micro_batch_tokens} is not a multiple of K*T = {tokens_per_sample}")
    cmd = [sys.executable, os.path.join(REPO, "pretrain_patch_gpt.py"), "--mock-data",
           "--vocab-size", str(args.vocab_size), "--num-layers", str(args.num_layers),
           "--hidden-size", str(args.hidden_size), "--num-attention-heads", str(args.num_attention_heads),
           "--ffn-hidden-size", str(args.ffn_hidden_size), "--seq-length", str(args.seq_length),
           "--untie-embeddings-and-output-weights",
           "--micro-batch-size", str(mbs), "--global-batch-size", str(mbs),
           "--train-iters", str(args.iters), "--log-interval", str(args.log_interval), "--eval-iters", "0",
           "--patch-size", str(K), "--patch-data-fraction", "0.667" if K > 1 else "0",
           "--lr", "3e-4", *RECIPE_FLAGS]
    if args.bf16:
        cmd.append("--bf16")
    return cmd + args.extra_args.split()


def mean(values):
    return sum(values) / len(values) if values else float("nan")


def run(args, K):
    # A free rendezvous port: the default one may be held by another run on this machine.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(parallel.free_port())}
    out = subprocess.run(stage_command(args, K), capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(out.stdout[-2000:] + out.stderr[-2000:])
    device = "GPU" if "GPU (NCCL)" in out.stdout else "CPU"
    lines = [f for _, f in sorted(log_reading.training_lines(out.stdout).items())
             if "tokens per second" in f]
    result = {name: mean([float(f[field].rstrip("%")) for f in lines[1:] if field in f])
              for name, field in RATES.items()}  # lines[0] is the warm-up interval
    peaks = [float(f[PEAK_MEMORY[device]]) for f in lines if PEAK_MEMORY[device] in f]
    result["peak MiB"] = max(peaks, default=float("nan"))  # a running peak: the last is the max
    return device, result


def main():
    from patch_megatron import cpu_mode

    on_gpu = not cpu_mode.should_use_cpu_mode()  # what pretrain_patch_gpt.py will decide
    defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-layers", type=int, default=defaults["num_layers"])
    p.add_argument("--hidden-size", type=int, default=defaults["hidden_size"])
    p.add_argument("--num-attention-heads", type=int, default=defaults["num_attention_heads"])
    p.add_argument("--ffn-hidden-size", type=int, default=defaults["ffn_hidden_size"])
    p.add_argument("--seq-length", type=int, default=defaults["seq_length"], help="T, the same in every stage")
    p.add_argument("--vocab-size", type=int, default=defaults["vocab_size"])
    p.add_argument("--micro-batch-tokens", type=int, default=defaults["micro_batch_tokens"],
                   help="tokens per micro-batch and per step, the same in every stage")
    p.add_argument("--patch-sizes", default="2,4,8")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--extra-args", default="", help="more pretrain_patch_gpt.py flags, for every run")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=defaults["bf16"],
                   help="default: on with a GPU, off on CPU")
    args = p.parse_args()
    if args.iters < 2 * args.log_interval:
        sys.exit("--iters must cover at least two --log-interval intervals (the first is warm-up)")

    rows = []
    for K in [1] + [int(k) for k in args.patch_sizes.split(",")]:
        device, r = run(args, K)
        rows.append((K, r))
        print(f"K={K} done on {device}", flush=True)
    if device == "GPU":
        import torch

        device = f"GPU ({torch.cuda.get_device_name()})"
    base = rows[0][1]
    print(f"\nconfig: {args.num_layers} layers, hidden {args.hidden_size}, ffn {args.ffn_hidden_size}, "
          f"{args.num_attention_heads} heads, T={args.seq_length}, vocab {args.vocab_size}, "
          f"{'bf16' if args.bf16 else 'fp32'}, {args.micro_batch_tokens} tokens per micro-batch and step, "
          f"{args.iters} iterations, device {device}"
          + (f", extra flags: {args.extra_args}" if args.extra_args else ""))
    print(f"peak MiB: {PEAK_MEMORY_MEANING[device[:3]]}; MFU: against the device's dense bf16 peak (none on CPU)")
    print(f"{'stage':<14}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU %':>8}{'x token':>9}{'/ K':>7}"
          f"{'peak MiB':>10}{'mem x token':>13}")
    for K, r in rows:
        ratio = r["tokens/s"] / base["tokens/s"]
        mfu = "-" if math.isnan(r["MFU %"]) else f"{r['MFU %']:.1f}"
        print(f"{'token' if K == 1 else f'patch K={K}':<14}{r['tokens/s']:>12.0f}{r['TFLOP/s']:>10.3f}"
              f"{mfu:>8}{ratio:>9.2f}{ratio / K:>7.2f}"
              f"{r['peak MiB']:>10.0f}{r['peak MiB'] / base['peak MiB']:>13.2f}")


if __name__ == "__main__":
    main()
