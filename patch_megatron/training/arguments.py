"""Command-line flags of ``pretrain_patch_gpt.py``: Megatron-LM's names and meanings, plus ours.

A Megatron-LM ``pretrain_gpt.py`` command line runs here once the script name
changes; ``--patch-size K --patch-data-fraction λ`` turn it into patch-level
training. Flags that overlap with Megatron-LM keep its names and meanings;
a flag left out takes Megatron-LM's default, so the model is GPT-3-style
(LayerNorm, GeLU, biases, learned positions, dropout 0.1) and Adam has
β2 0.999 and weight decay 0.01 unless the command says otherwise; the paper's
LLaMA recipe is spelled out as flags (``patch_megatron/llama_recipe.py``).

Conventions shared with the data pipeline and the planner
--------------------------------------------------------
* ``--seq-length`` is T, the positions the model sees: tokens in the token
  stage, patches in the patch stage, where a sample carries K*T tokens.
* One invocation runs one stage: ``--patch-size K`` with K > 1 runs the patch
  stage of a run with ``--patch-data-fraction λ`` (it reads the first λ of the
  training stream); ``--patch-size 1`` with λ > 0 runs that run's token stage
  (the rest of the stream); λ = 0 is ordinary token-only training. Each stage
  counts its own iterations from 0, with its own warmup + decay.
* ``--global-batch-size``, ``--train-iters`` and ``--train-samples`` keep
  Megatron-LM's meaning for *this* run: samples per step and steps of this
  stage. The paper keeps tokens per step equal in both stages: give the patch
  stage ``--global-batch-size B/K`` where the token stage has B (K times fewer
  micro-batches of the same [micro-batch-size, T] shape).
* ``--rampup-batch-size START INCREMENT RAMPUP_SAMPLES`` ramps the global batch
  up to ``--global-batch-size`` over this run's first RAMPUP_SAMPLES samples
  (patch_megatron/training/batch_rampup.py); as in Megatron-LM it needs
  ``--train-samples`` and a schedule in samples.
* ``--train-tokens D`` (ours) is instead the budget of the whole two-stage
  run: this stage trains on its share (λ*D or (1-λ)*D tokens) and derives its
  steps from it, so nobody computes step counts by hand.
* Where this stage's data begins in the stream: 0 for the patch stage; for the
  token stage λ*D, with D = (this stage's tokens) / (1-λ).

``parse_args`` checks everything that does not depend on the machine (so
the planner can parse emitted GPU commands anywhere); ``check_world_size``
checks the number of processes and what CPU mode cannot do, and counts a batch
ramp's steps with megatron-core's calculator (the one import of megatron-core
here, for ramped commands only). Both run before any process
group starts and raise :class:`ArgumentError` whose message names the fix.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import warnings
from dataclasses import dataclass

from patch_megatron.data.tokenizers import SUPPORTED_TYPES, add_bpe_file_args, add_tiktoken_args
from patch_megatron.model.shape import ModelShape, padded_vocab_size
from patch_megatron.training import megatron_lm_flags
from patch_megatron.stage import Stage


class ArgumentError(ValueError):
    """A bad flag or flag combination; the message says how to fix it."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors raise ArgumentError instead of exiting (the entry point prints them)."""

    def error(self, message):
        if "unrecognized arguments" in message:
            message += (
                " (pretrain_patch_gpt.py takes Megatron-LM's model, batch, optimizer, data, "
                "checkpoint and logging flags listed in --help; remove the others)"
            )
        raise ArgumentError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pretrain_patch_gpt.py",
        description="Patch-level GPT pretraining on megatron-core (one stage per run).",
        allow_abbrev=False,
    )

    g = parser.add_argument_group(
        "model (Megatron-LM's names and defaults)",
        "A GPT-3-style decoder unless flags say otherwise. The paper's LLaMA recipe is "
        "--normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear "
        "--attention-dropout 0 --hidden-dropout 0.")
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="default: 4 x hidden; with --swiglu 8/3 x hidden rounded down to a "
                        "multiple of 64 (Megatron-LM's)")
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--kv-channels", type=int, default=None,
                   help="per-head width (default: hidden / heads)")
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=None)
    g.add_argument("--seq-length", type=int, required=True,
                   help="T, the model positions: tokens in the token stage, patches in the patch "
                        "stage (a patch-stage sample carries K*T tokens)")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="default: --seq-length (positions are patch indices, so T)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="separate input embedding and LM head (the paper's LLaMA setup)")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--apply-layernorm-1p", action="store_true",
                   help="the norms' weights hold gamma - 1 (zero-centred), as in Megatron-LM")
    g.add_argument("--swiglu", action="store_true",
                   help="gated SiLU MLP instead of GeLU")
    g.add_argument("--squared-relu", action="store_true",
                   help="squared-ReLU MLP instead of GeLU")
    g.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_false",
                   help="no biases in the linear layers")
    g.add_argument("--add-qkv-bias", action="store_true",
                   help="biases on the QKV projection only (with --disable-bias-linear)")
    g.add_argument("--position-embedding-type", default="learned_absolute",
                   choices=["learned_absolute", "rope", "none"])
    g.add_argument("--use-rotary-position-embeddings", action="store_true",
                   help="deprecated spelling of --position-embedding-type rope (as in Megatron-LM)")
    g.add_argument("--no-position-embedding", dest="add_position_embedding",
                   action="store_false",
                   help="deprecated; accepted with RoPE, where it changes nothing (as in Megatron-LM)")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--rotary-interleaved", action="store_true",
                   help="RoPE rotates interleaved (even, odd) channel pairs (RoFormer) instead of "
                        "the two halves of each head")
    g.add_argument("--qk-layernorm", action="store_true",
                   help="a --normalization norm over each query and key head before RoPE "
                        "(as in Qwen3)")
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--apply-query-key-layer-scaling", action="store_true",
                   help="scale Q.K^T by 1/layer number (fp16 range); implies "
                        "--attention-softmax-in-fp32")
    g.add_argument("--attention-softmax-in-fp32", action="store_true",
                   help="half precision: attention scores and softmax in fp32")
    g.add_argument("--transformer-impl", choices=["transformer_engine", "local"], default=None,
                   help="layers: Transformer Engine's, or megatron-core's local ones with torch's "
                        "scaled_dot_product_attention (flash / memory-efficient kernels on GPU); "
                        "default: transformer_engine when it is installed, else local. "
                        "Checkpoints load in either")

    g = parser.add_argument_group("patch-level training (ours)")
    g.add_argument("--patch-size", type=int, default=1,
                   help="K tokens per patch; K > 1 runs the patch stage, 1 the token stage")
    g.add_argument("--patch-data-fraction", type=float, default=0.0,
                   help="λ, the fraction of the training data the patch stage consumes "
                        "(0: token-only training)")
    g.add_argument("--eval-token-nll", action=argparse.BooleanOptionalAction, default=True,
                   help="patch stage: also evaluate the token NLL of the same weights run with K=1, "
                        "comparable with the token stage's curve")

    g = parser.add_argument_group("batch and length")
    g.add_argument("--micro-batch-size", type=int, required=True)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="samples of this stage per step (default: micro-batch-size x data-parallel "
                        "size); patch stage: B/K for the token stage's B keeps tokens per step equal")
    g.add_argument("--train-iters", type=int, default=None, help="steps of this stage")
    g.add_argument("--train-samples", type=int, default=None,
                   help="samples of this stage (steps = samples // global batch)")
    g.add_argument("--train-tokens", type=int, default=None,
                   help="token budget of the whole run, both stages; this stage takes its λ share")
    g.add_argument("--rampup-batch-size", type=int, nargs=3, default=None,
                   metavar=("START", "INCREMENT", "RAMPUP_SAMPLES"),
                   help="as in Megatron-LM: the global batch starts at START samples and grows "
                        "by INCREMENT in equal shares of the first RAMPUP_SAMPLES samples of this "
                        "run, up to --global-batch-size; needs --train-samples")

    g = parser.add_argument_group("optimizer and learning-rate schedule (per stage)")
    g.add_argument("--optimizer", choices=["adam"], default="adam", help="AdamW (decoupled decay)")
    g.add_argument("--lr", type=float, default=None, help="required (Megatron-LM has no default)")
    g.add_argument("--decoupled-lr", type=float, default=None,
                   help="peak learning rate of the input embedding and output layer (default: --lr)")
    g.add_argument("--decoupled-min-lr", type=float, default=None,
                   help="their minimum learning rate (default: --min-lr)")
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="linear",
                   choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    g.add_argument("--lr-decay-iters", type=int, default=None,
                   help="default: the stage's iterations")
    g.add_argument("--lr-decay-samples", type=int, default=None,
                   help="as --lr-decay-iters, in samples (a multiple of the global batch)")
    g.add_argument("--lr-warmup-iters", type=int, default=0,
                   help="warmup steps of each stage (the paper uses 2000)")
    g.add_argument("--lr-warmup-samples", type=int, default=0,
                   help="as --lr-warmup-iters, in samples (a multiple of the global batch)")
    g.add_argument("--lr-wsd-decay-style", default="exponential",
                   choices=["exponential", "linear", "cosine", "minus_sqrt"],
                   help="WSD: the shape of its final decay")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                   help="WSD: steps of the final decay")
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None,
                   help="WSD: samples of the final decay (a multiple of the global batch)")
    g.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                   action="store_true", dest="override_opt_param_scheduler",
                   help="on resume, the flags' schedule replaces the checkpoint's")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                   action="store_true", dest="use_checkpoint_opt_param_scheduler",
                   help="on resume, the checkpoint's schedule replaces the flags' (default: they "
                        "must agree, as in Megatron-LM)")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warmup as a fraction of the stage's decay steps")
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--start-weight-decay", type=float, default=None,
                   help="with --weight-decay-incr-style linear/cosine: the first step's decay")
    g.add_argument("--end-weight-decay", type=float, default=None,
                   help="with --weight-decay-incr-style linear/cosine: the last step's decay")
    g.add_argument("--weight-decay-incr-style", default="constant",
                   choices=["constant", "linear", "cosine"])
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--nan-action", choices=["stop", "skip"], default="stop",
                   help="a NaN/Inf loss or gradient: stop (with --rerun-mode validate_results as "
                        "in Megatron-LM: the step is rerun, then a checkpoint of the weights "
                        "before it is saved and the run exits 16 or 17; with --rerun-mode "
                        "disabled, or at the first step, an error, nothing saved), or skip the "
                        "update and go on")

    g = parser.add_argument_group(
        "rerun engine (megatron-core's RerunStateMachine)",
        "Each micro-batch's loss (and, with --nan-action stop, each gradient bucket) is "
        "validated; a rejected result reruns the step in place to tell a transient fault from a "
        "reproducible one, as in Megatron-LM.")
    g.add_argument("--rerun-mode", default="validate_results",
                   choices=["disabled", "validate_results", "report_stats"],
                   help="validate_results: rerun a step whose result is rejected; disabled: "
                        "no validation (the loop's own NaN/Inf checks stop the run); report_stats "
                        "is refused (megatron-core 0.16.1 cannot report its statistics)")
    g.add_argument("--error-injection-rate", type=int, default=0,
                   help="inject a rejected result once every this many validations (0: never)")
    g.add_argument("--error-injection-type", default="transient_error",
                   choices=["correct_result", "transient_error", "persistent_error"])
    g.add_argument("--check-for-spiky-loss", action="store_true",
                   help="reject (non-fatally) a loss over 10 times the largest seen so far")
    g.add_argument("--check-for-large-grads", action="store_true",
                   help="reject (non-fatally) a gradient bucket norm over 10 times the largest "
                        "seen so far")
    g.add_argument("--result-rejected-tracker-filename", default=None,
                   help="append every rejected result to this file")

    g = parser.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None,
                   help="fp16: a static loss scale instead of the dynamic one")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32,
                   help="fp16: the dynamic loss scale's start (halved after overflows)")
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=int, default=1000,
                   help="fp16: steps without overflow before the dynamic loss scale doubles")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true",
                   help="accumulate and reduce gradients in fp32 (the default with --bf16, as in "
                        "Megatron-LM)")
    g.add_argument("--grad-reduce-in-bf16", action="store_true",
                   help="--bf16: reduce gradients over data-parallel ranks in bf16")
    g.add_argument("--hysteresis", type=int, default=2,
                   help="fp16: overflows tolerated before the dynamic loss scale halves")

    g = parser.add_argument_group("parallelism and device")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                   help="layers on the first pipeline stage (which also holds the embedding); "
                        "the stages between split the rest evenly")
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None,
                   help="layers on the last pipeline stage (which also computes the loss)")
    g.add_argument("--account-for-embedding-in-pipeline-split", action="store_true",
                   help="count the embedding as a layer in the even split over pipeline stages "
                        "(the first stage builds one layer fewer)")
    g.add_argument("--account-for-loss-in-pipeline-split", action="store_true",
                   help="count the loss as a layer in the even split over pipeline stages (the "
                        "last stage builds one layer fewer)")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved pipeline schedule: layers per model chunk (each pipeline "
                        "rank holds several chunks, spread over the pipeline)")
    g.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None,
                   help="interleaved pipeline schedule: model chunks per pipeline rank")
    g.add_argument("--microbatch-group-size-per-virtual-pipeline-stage", type=int, default=None,
                   dest="microbatch_group_size_per_vp_stage",
                   help="interleaved schedule: consecutive micro-batches per model chunk "
                        "(default: the pipeline-parallel size)")
    g.add_argument("--no-overlap-p2p-communication", action="store_false",
                   dest="overlap_p2p_comm",
                   help="interleaved schedule: send and receive between stages without "
                        "overlapping them with compute (then PP must be > 2)")
    g.add_argument("--overlap-p2p-communication-warmup-flush", action="store_true",
                   dest="overlap_p2p_comm_warmup_flush",
                   help="interleaved schedule: overlap the warmup's and flush's sends too")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="reduce each gradient bucket over data-parallel ranks while the backward "
                        "pass goes on, instead of all at once after it")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="with --use-distributed-optimizer: all-gather the updated parameters "
                        "bucket by bucket during the next forward pass, instead of after the step")
    g.add_argument("--use-tp-pp-dp-mapping", action="store_true",
                   help="number the ranks tensor-parallel first, then pipeline, then data "
                        "parallel (default: data-parallel replicas before pipeline stages)")
    g.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=None,
                   help="--cpu forces CPU mode (gloo), --no-cpu forbids it; default: CPU mode "
                        "exactly when no GPU exists")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="1 only: context parallelism needs Transformer Engine's attention, which "
                        "the patch embedding is not wired to yet")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="recompute activations in the backward pass instead of keeping them")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--distribute-saved-activations", action="store_true")
    g.add_argument("--deterministic-mode", action="store_true",
                   help="megatron-core's deterministic kernels (bitwise reproducible, slower)")
    g.add_argument("--manual-gc", action="store_true",
                   help="Python's garbage collector off; collections at fixed iterations instead, "
                        "the same on every rank")
    g.add_argument("--manual-gc-interval", type=int, default=0,
                   help="--manual-gc: a full collection every this many iterations (0: never)")
    g.add_argument("--no-manual-gc-eval", "--disable-manual-gc-eval", dest="manual_gc_eval",
                   action="store_false",
                   help="--manual-gc: no collections around each evaluation")

    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="PREFIX, or a weighted blend W1 PREFIX1 W2 PREFIX2 ...")
    g.add_argument("--split", default="969, 30, 1", help="train, valid, test weights")
    g.add_argument("--tokenizer-type", default=None, choices=SUPPORTED_TYPES)
    g.add_argument("--tokenizer-model", default=None)
    add_bpe_file_args(g)
    add_tiktoken_args(g)
    g.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size for --mock-data, NullTokenizer or TikTokenizer")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--num-workers", type=int, default=2,
                   help="processes reading samples for each dataset (0: the training process "
                        "reads them); the same samples in the same order")
    g.add_argument("--mock-data", action="store_true",
                   help="synthetic learnable sequences instead of --data-path (tests, smoke runs)")
    g.add_argument("--fim-data", action="store_true",
                   help="fill-in-the-middle samples, as Megatron-LM's (patch_megatron/data/fim.py)")
    g.add_argument("--fim-rate", type=float, default=0.5,
                   help="--fim-data: the chance that a segment is rearranged")
    g.add_argument("--fim-spm-rate", type=float, default=0.5,
                   help="--fim-data: the chance that a rearranged segment is SPM rather than PSM")
    g.add_argument("--fim-split-sample", default=None,
                   help="--fim-data: a token at which segments are cut into fragments, each "
                        "rearranged on its own")
    g.add_argument("--fim-fragment-rate", type=float, default=None,
                   help="--fim-split-sample: the chance that a fragment is rearranged")
    g.add_argument("--fim-no-prefix", default=None,
                   help="--fim-data: leave alone the pieces whose text starts with this")
    for name, token in (("prefix", "<fim_prefix>"), ("middle", "<fim_middle>"),
                        ("suffix", "<fim_suffix>"), ("pad", "<fim_pad>"),
                        ("eod", "<|endoftext|>")):
        g.add_argument(f"--fim-{name}-token", default=token)

    g = parser.add_argument_group("checkpoints (Megatron-LM layout)")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--save-retain-interval", type=int, default=None,
                   help="keep only the checkpoints whose iteration is a multiple of this (and the "
                        "latest): each save deletes the one it replaces otherwise")
    g.add_argument("--overwrite-save", action="store_true",
                   help="this project's flag (not Megatron-LM's): let a run that loaded no "
                        "checkpoint write into a --save that already holds checkpoints, replacing "
                        "them; without it such a run is refused before training")
    g.add_argument("--ckpt-format", default="torch_dist",
                   choices=["torch_dist", "torch", "torch_dcp", "fsdp_dtensor"],
                   help="what saves write: torch_dist (Megatron-LM's default, loads at any "
                        "TP/PP) or torch (its legacy format: a file per TP x PP rank, loads at "
                        "the same TP/PP only); loading reads either")
    g.add_argument("--dist-ckpt-strictness", default="assume_ok_unexpected",
                   choices=["assume_ok_unexpected", "log_unexpected", "log_all",
                            "raise_unexpected", "raise_all", "return_unexpected", "return_all",
                            "ignore_all"],
                   help="what a load does with keys the checkpoint and the model do not share "
                        "(megatron-core's StrictHandling)")
    g.add_argument("--finetune", action="store_true",
                   help="load weights only: iteration, optimizer, schedule and data position reset")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")

    g = parser.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--tensorboard-log-interval", type=int, default=1,
                   help="write the training scalars every this many iterations")
    g.add_argument("--tensorboard-queue-size", type=int, default=1000,
                   help="events held before a write forces a flush to disk")
    g.add_argument("--log-timers-to-tensorboard", action="store_true",
                   help="also the time per iteration and TFLOP/s per device (at --log-interval)")
    g.add_argument("--no-log-loss-scale-to-tensorboard", "--disable-log-loss-scale-to-tensorboard",
                   dest="log_loss_scale_to_tensorboard", action="store_false",
                   help="leave out the loss scale (1 unless --fp16)")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true",
                   help="also the validation perplexities")
    g.add_argument("--log-memory-to-tensorboard", action="store_true",
                   help="also this rank's memory (GPU: the allocator's; CPU: the peak RSS)")
    g.add_argument("--log-world-size-to-tensorboard", action="store_true")
    g.add_argument("--wandb-project", default="",
                   help="also log the TensorBoard scalars to this Weights & Biases project "
                        "(pip install wandb); offline unless WANDB_API_KEY or WANDB_MODE is set")
    g.add_argument("--wandb-exp-name", default="", help="the W&B run's name (needed with a project)")
    g.add_argument("--wandb-save-dir", default="", help="where W&B writes (default: --save/wandb)")
    g.add_argument("--wandb-entity", default="", help="the W&B team or user")
    g.add_argument("--profile", action="store_true",
                   help="profile steps --profile-step-start..--profile-step-end: an nsys capture "
                        "range (cudaProfilerStart/Stop), or torch.profiler with "
                        "--use-pytorch-profiler")
    g.add_argument("--profile-step-start", type=int, default=10)
    g.add_argument("--profile-step-end", type=int, default=12)
    g.add_argument("--use-pytorch-profiler", action="store_true",
                   help="--profile with torch.profiler, its trace into --tensorboard-dir")
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0])
    g.add_argument("--log-params-norm", action="store_true",
                   help="add the parameters' L2 norm to the log line")
    g.add_argument("--log-num-zeros-in-grad", action="store_true",
                   help="add the number of zero gradient entries to the log line")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak for MFU; default: the known peak of the GPU, none on CPU")

    g = parser.add_argument_group("exit")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop (after saving) when the iteration is a multiple of this")
    g.add_argument("--exit-duration-in-mins", type=float, default=None)
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM: finish the iteration, save, exit 0")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--check-only", type=int, default=None, metavar="WORLD_SIZE",
                   help="this project's flag: check the command line for WORLD_SIZE processes, "
                        "print the arguments and the effective model, optimizer, schedule and "
                        "data plan, and exit without starting processes or training")

    from patch_megatron.est.arguments import add_est_args

    add_est_args(parser)  # --est and its schedule (patch_megatron/est)
    megatron_lm_flags.add_to_parser(parser)
    return parser


# ---------------------------------------------------------------------------
# Derived quantities of the stage this run executes.

def _in_steps(samples: int, batch: int) -> int | float:
    steps, rest = divmod(samples, batch)
    return steps if rest == 0 else samples / batch


@dataclass(frozen=True)
class StagePlan:
    """Which stage this run is, its batch and length, and where its data begins."""

    name: Stage
    patch_size: int  # K
    seq_length: int  # T, model positions
    global_batch_size: int  # samples of this stage per step
    train_iters: int  # this stage's steps
    # The schedule, in samples as Megatron-LM's scheduler counts them.
    lr_warmup_samples: int | float  # float from --lr-warmup-fraction
    lr_decay_samples: int
    data_start_token: int  # where this stage's training data begins in the stream
    train_samples: int | None = None  # default: train_iters x global batch
    lr_wsd_decay_samples: int | None = None  # WSD: samples of the final decay
    # --rampup-batch-size (START, INCREMENT, RAMPUP_SAMPLES): global_batch_size is then the
    # batch the ramp ends at, and the steps' batches come from megatron-core's calculator.
    rampup_batch_size: tuple[int, int, int] | None = None
    samples_read: int | None = None  # samples the steps consume; default: train_iters x batch

    def __post_init__(self):
        if self.train_samples is None:
            object.__setattr__(self, "train_samples", self.train_iters * self.global_batch_size)
        if self.samples_read is None:
            object.__setattr__(self, "samples_read", self.train_iters * self.global_batch_size)

    @property
    def lr_warmup_iters(self) -> int | float:
        return _in_steps(self.lr_warmup_samples, self.global_batch_size)

    @property
    def lr_decay_iters(self) -> int | float:
        return _in_steps(self.lr_decay_samples, self.global_batch_size)

    @property
    def lr_wsd_decay_iters(self) -> int | float | None:
        if self.lr_wsd_decay_samples is None:
            return None
        return _in_steps(self.lr_wsd_decay_samples, self.global_batch_size)

    @property
    def tokens_per_sample(self) -> int:
        return self.patch_size * self.seq_length

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.tokens_per_sample

    @property
    def train_tokens(self) -> int:
        return self.samples_read * self.tokens_per_sample

    @property
    def loss_name(self) -> str:
        return "patch loss" if self.name == Stage.PATCH else "lm loss"


def stage_iterations(train_tokens: int, patch_data_fraction: float, tokens_per_step: int) -> tuple[int, int]:
    """(patch stage, token stage) steps of a ``train_tokens`` budget at ``tokens_per_step``:
    the patch stage takes the whole steps of the budget's first λ, the token stage the rest of
    the budget's whole steps. The token stage's data starts at round(λ·D), at or past the end
    of the patch stage's, so the two never share data."""
    patch_share = round(train_tokens * patch_data_fraction)
    patch = patch_share // tokens_per_step
    return patch, train_tokens // tokens_per_step - patch


def stage_plan(args) -> StagePlan:
    K, lam, B = args.patch_size, args.patch_data_fraction, args.global_batch_size
    name = Stage.of(K)
    tokens_per_step = B * K * args.seq_length
    ramp = samples_read = None
    if args.rampup_batch_size is not None:  # checked: with --train-samples
        from patch_megatron.training.batch_rampup import ramp_length

        ramp = tuple(args.rampup_batch_size)
        length = ramp_length(ramp, B, args.micro_batch_size, args.train_samples)
        train_iters, samples_read = length.train_iters, length.samples_read
    elif args.train_iters is not None:
        train_iters = args.train_iters
    elif args.train_samples is not None:
        train_iters = args.train_samples // B
    else:
        patch_iters, token_iters = stage_iterations(args.train_tokens, lam, tokens_per_step)
        train_iters = patch_iters if name == Stage.PATCH else token_iters
    stage_tokens = (train_iters * B if samples_read is None else samples_read) * K * args.seq_length
    if name == Stage.PATCH:
        data_start = 0
    elif args.train_tokens is not None:
        data_start = round(args.train_tokens * lam)  # the patch stage read at most this much
    else:
        data_start = round(stage_tokens * lam / (1.0 - lam))

    # Megatron-LM's scheduler counts samples: flags in iterations count B samples each.
    train_samples = args.train_samples if args.train_samples is not None else train_iters * B
    if args.lr_decay_samples is not None:
        decay = args.lr_decay_samples
    elif args.lr_decay_iters is not None:
        decay = args.lr_decay_iters * B
    else:
        decay = train_samples
    if args.lr_warmup_fraction is not None:
        warmup = args.lr_warmup_fraction * decay  # a float, as Megatron-LM's
    elif args.lr_warmup_samples:
        warmup = args.lr_warmup_samples
    else:
        warmup = args.lr_warmup_iters * B
    wsd = args.lr_wsd_decay_samples
    if wsd is None and args.lr_wsd_decay_iters is not None:
        wsd = args.lr_wsd_decay_iters * B
    return StagePlan(
        name=name, patch_size=K, seq_length=args.seq_length, global_batch_size=B,
        train_iters=train_iters, lr_warmup_samples=warmup, lr_decay_samples=decay,
        data_start_token=data_start, train_samples=train_samples, lr_wsd_decay_samples=wsd,
        rampup_batch_size=ramp, samples_read=samples_read,
    )


# ---------------------------------------------------------------------------
# Checks.

def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ArgumentError(message)


def _check_model(a) -> None:
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                 "micro_batch_size", "make_vocab_size_divisible_by",
                 "tensor_model_parallel_size", "pipeline_model_parallel_size"):
        _require(getattr(a, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    _require(0 <= a.attention_dropout < 1 and 0 <= a.hidden_dropout < 1,
             "--attention-dropout and --hidden-dropout must lie in [0, 1)")
    _require(not (a.swiglu and a.squared_relu), "--swiglu and --squared-relu both set: pick one")
    _require(a.add_position_embedding or a.position_embedding_type == "rope",
             "--no-position-embedding is deprecated (as in Megatron-LM): use "
             "--position-embedding-type none")
    if a.num_query_groups is not None:
        _require(a.group_query_attention,
                 "--num-query-groups needs --group-query-attention (as in Megatron-LM)")
    if a.group_query_attention:
        _require(a.num_query_groups is not None,
                 "--group-query-attention needs --num-query-groups")
    try:  # the shape's own checks, before the tokenizer gives the vocabulary
        counted = dict(embedding_in_split=a.account_for_embedding_in_pipeline_split,
                       loss_in_split=a.account_for_loss_in_pipeline_split)
        model_shape(a).check_parallel(a.tensor_model_parallel_size, a.pipeline_model_parallel_size,
                                      a.decoder_first_pipeline_num_layers,
                                      a.decoder_last_pipeline_num_layers, **counted)
        # The chunks per rank follow from a split known to be valid; then each stage's layers
        # must divide into them.
        a.virtual_pipeline_model_parallel_size = _virtual_pipeline_size(a)
        if a.virtual_pipeline_model_parallel_size is not None:
            model_shape(a).check_parallel(
                a.tensor_model_parallel_size, a.pipeline_model_parallel_size,
                a.decoder_first_pipeline_num_layers, a.decoder_last_pipeline_num_layers,
                a.virtual_pipeline_model_parallel_size, **counted)
    except ValueError as error:
        raise ArgumentError(str(error)) from None
    tp = a.tensor_model_parallel_size
    _require(not a.sequence_parallel or a.seq_length % tp == 0,
             f"--sequence-parallel splits the {a.seq_length} positions over {tp} ranks: use a "
             "--seq-length divisible by --tensor-model-parallel-size")
    if a.max_position_embeddings is not None:
        _require(a.max_position_embeddings >= a.seq_length,
                 f"--max-position-embeddings {a.max_position_embeddings} is below --seq-length "
                 f"{a.seq_length} (positions are patch indices, so T not K*T)")


def _check_wandb(a) -> None:
    if a.wandb_project:
        # Megatron-LM refuses a project without a run name too.
        _require(a.wandb_exp_name, "--wandb-project needs --wandb-exp-name (the run's name)")
        _require(a.wandb_save_dir or a.save, "--wandb-project writes into --save/wandb: give "
                 "--save or --wandb-save-dir")


def _check_patch_and_length(a) -> None:
    K, lam = a.patch_size, a.patch_data_fraction
    _require(K >= 1, f"--patch-size must be >= 1, got {K}")
    _require(0.0 <= lam <= 1.0, f"--patch-data-fraction must lie in [0, 1], got {lam}")
    _require(not (K > 1 and lam == 0.0),
             f"--patch-size {K} runs the patch stage, but --patch-data-fraction is 0 so it has no "
             "data: pass --patch-data-fraction λ (e.g. 0.667)")
    _require(not (K == 1 and lam == 1.0),
             "--patch-size 1 runs the token stage, but --patch-data-fraction 1 leaves it no data: "
             "use λ < 1, or --patch-size K > 1 for the patch stage")
    lengths = [f for f in ("train_iters", "train_samples", "train_tokens") if getattr(a, f) is not None]
    _require(len(lengths) == 1,
             "give the run's length with exactly one of --train-iters, --train-samples, "
             f"--train-tokens (got {len(lengths) or 'none'})")
    _require(getattr(a, lengths[0]) >= 1, f"--{lengths[0].replace('_', '-')} must be >= 1")
    if a.global_batch_size is not None:
        _require(a.global_batch_size >= 1, "--global-batch-size must be >= 1")
        _require(a.global_batch_size % a.micro_batch_size == 0,
                 f"--global-batch-size {a.global_batch_size} is not a multiple of "
                 f"--micro-batch-size {a.micro_batch_size}; change one of them")
        if a.train_samples is not None:
            _require(a.train_samples >= a.global_batch_size,
                     f"--train-samples {a.train_samples} is less than one global batch "
                     f"({a.global_batch_size})")


def _virtual_pipeline_size(a) -> int | None:
    """Model chunks per pipeline rank of the interleaved schedule (None: not interleaved), as
    Megatron-LM derives it from the two flags that can ask for it."""
    per_chunk, chunks = (a.num_layers_per_virtual_pipeline_stage,
                         a.num_virtual_stages_per_pipeline_rank)
    if per_chunk is None and chunks is None:
        _require(a.microbatch_group_size_per_vp_stage is None
                 and not a.overlap_p2p_comm_warmup_flush,
                 "--microbatch-group-size-per-virtual-pipeline-stage and "
                 "--overlap-p2p-communication-warmup-flush tune the interleaved schedule: add "
                 "--num-layers-per-virtual-pipeline-stage or --num-virtual-stages-per-pipeline-rank")
        return None
    _require(per_chunk is None or chunks is None,
             "give one of --num-layers-per-virtual-pipeline-stage and "
             "--num-virtual-stages-per-pipeline-rank")
    pp = a.pipeline_model_parallel_size
    if chunks is None:
        _require(a.decoder_first_pipeline_num_layers is None
                 and a.decoder_last_pipeline_num_layers is None,
                 "with uneven pipeline stages give the chunks per rank with "
                 "--num-virtual-stages-per-pipeline-rank (as Megatron-LM requires)")
        # As in Megatron-LM, an embedding or loss counted in the split counts here too.
        per_rank = (a.num_layers + a.account_for_embedding_in_pipeline_split
                    + a.account_for_loss_in_pipeline_split) // pp
        _require(per_chunk >= 1 and per_rank % per_chunk == 0,
                 f"--num-layers-per-virtual-pipeline-stage {per_chunk} must divide the {per_rank} "
                 f"layers of each of the {pp} pipeline stages")
        chunks = per_rank // per_chunk
    _require(chunks >= 1, "--num-virtual-stages-per-pipeline-rank must be >= 1")
    if chunks == 1:
        return None  # one chunk per rank: the plain schedule, as in Megatron-LM
    if a.overlap_p2p_comm:
        _require(pp > 1, "the interleaved pipeline schedule needs --pipeline-model-parallel-size "
                 "> 1")
    else:
        _require(pp > 2, "the interleaved schedule without --overlap-p2p-communication needs "
                 "--pipeline-model-parallel-size > 2 (as in Megatron-LM: otherwise two ranks "
                 "exchange several sends and receives in one batch)")
    return chunks


def _check_interleaved_micro_batches(a, micro_batches: int, which: str) -> None:
    """megatron-core's interleaved schedule runs micro-batches in groups of N per chunk."""
    pp = a.pipeline_model_parallel_size
    group = a.microbatch_group_size_per_vp_stage or pp
    _require(pp <= group <= micro_batches and (micro_batches % group == 0
                                               or micro_batches % group >= pp),
             f"the interleaved pipeline schedule runs {which} of {micro_batches} micro-batches "
             f"per data-parallel rank in groups of {group} "
             "(--microbatch-group-size-per-virtual-pipeline-stage, default the PP size): it needs "
             f"PP {pp} <= {group} <= {micro_batches}, and a last group of 0 or at least {pp}. "
             "Change --global-batch-size or --micro-batch-size")


def _check_rampup_flags(a) -> None:
    """What --rampup-batch-size needs of the other flags (its batches: _check_rampup)."""
    if a.rampup_batch_size is None:
        return
    start, increment, rampup_samples = a.rampup_batch_size
    # Megatron-LM asserts START, INCREMENT >= 1 and RAMPUP_SAMPLES >= 0, then divides by zero
    # at RAMPUP_SAMPLES 0 (a ramp over no samples is no ramp).
    _require(start >= 1 and increment >= 1 and rampup_samples >= 1,
             f"--rampup-batch-size {start} {increment} {rampup_samples}: START, INCREMENT and "
             "RAMPUP_SAMPLES must be >= 1 (a ramp over 0 samples is no ramp: drop the flag)")
    length = "--train-iters" if a.train_iters is not None else "--train-tokens"
    _require(a.train_samples is not None,
             f"--rampup-batch-size counts its ramp in samples, so the run's length must be in "
             f"samples too: give --train-samples instead of {length} (Megatron-LM refuses a ramp "
             "with iteration-based training)")
    # A step's samples change during the ramp: a length in steps would not be a number of
    # samples, which is what the schedule counts.
    in_steps = [f"--{f.replace('_', '-')}" for f in ("lr_warmup_iters", "lr_decay_iters",
                                                      "lr_wsd_decay_iters") if getattr(a, f)]
    _require(not in_steps,
             f"{' and '.join(in_steps)} with --rampup-batch-size: a step's samples change during "
             "the ramp, so give the schedule in samples (--lr-warmup-samples or "
             "--lr-warmup-fraction, --lr-decay-samples, --lr-wsd-decay-samples), as Megatron-LM "
             "requires with --train-samples")


def _check_rampup(a, dp: int) -> None:
    """The ramp's batches against the final batch and the data-parallel layout, so that every
    step's batch is whole micro-batches on every rank (megatron-core's calculator asserts it)."""
    start, increment, rampup_samples = a.rampup_batch_size
    final = a.global_batch_size
    flags = f"--rampup-batch-size {start} {increment} {rampup_samples}"
    _require(start < final,
             f"{flags} starts at {start} samples, "
             + ("the --global-batch-size itself: there is nothing to ramp; drop "
                "--rampup-batch-size" if start == final else
                f"above --global-batch-size {final}: START must be smaller"))
    _require((final - start) % increment == 0,
             f"{flags}: the ramp from {start} to --global-batch-size {final} is not a whole "
             f"number of increments of {increment}; pick an INCREMENT that divides {final - start}")
    per_step = a.micro_batch_size * dp
    _require(start % per_step == 0 and increment % per_step == 0,
             f"{flags}: every batch of the ramp must be whole micro-batches on each data-parallel "
             f"rank, so START and INCREMENT must be multiples of micro-batch-size x data-parallel "
             f"size = {a.micro_batch_size} x {dp} = {per_step} (megatron-core's calculator "
             "asserts it at each step)")


def _check_optimizer(a) -> None:
    _require(a.lr is not None, "give the peak learning rate with --lr (Megatron-LM has no "
             "default either); the paper's recipe uses 3e-4")
    _require(a.decoupled_min_lr is None or a.decoupled_lr is not None,
             "--decoupled-min-lr needs --decoupled-lr")
    _require(a.decoupled_lr is None or (math.isfinite(a.decoupled_lr) and a.decoupled_lr > 0),
             "--decoupled-lr must be a positive number")
    _require(math.isfinite(a.lr) and math.isfinite(a.min_lr),
             f"--lr and --min-lr must be finite numbers (got lr {a.lr}, min-lr {a.min_lr})")
    _require(a.lr > 0 and 0 <= a.min_lr <= a.lr,
             f"need --lr > 0 and 0 <= --min-lr <= --lr (got lr {a.lr}, min-lr {a.min_lr})")
    warmups = [f for f, v in (("--lr-warmup-fraction", a.lr_warmup_fraction is not None),
                              ("--lr-warmup-iters", a.lr_warmup_iters),
                              ("--lr-warmup-samples", a.lr_warmup_samples)) if v]
    _require(len(warmups) <= 1, f"{' and '.join(warmups)} all give the warmup: keep one")
    _require(not (a.lr_decay_iters is not None and a.lr_decay_samples is not None),
             "--lr-decay-iters and --lr-decay-samples both set: keep one")
    _require(a.lr_warmup_samples >= 0, "--lr-warmup-samples must be >= 0")
    if a.lr_decay_style == "WSD":
        _require(a.lr_wsd_decay_iters is not None or a.lr_wsd_decay_samples is not None,
                 "--lr-decay-style WSD needs --lr-wsd-decay-iters (or --lr-wsd-decay-samples): "
                 "the length of its final decay")
    if a.weight_decay_incr_style == "constant":
        _require(a.start_weight_decay is None and a.end_weight_decay is None,
                 "--start-weight-decay/--end-weight-decay need --weight-decay-incr-style linear "
                 "or cosine (as in Megatron-LM); with constant, give --weight-decay")
    else:
        _require(a.start_weight_decay is not None and a.end_weight_decay is not None,
                 f"--weight-decay-incr-style {a.weight_decay_incr_style} needs "
                 "--start-weight-decay and --end-weight-decay")
    _require(not (a.override_opt_param_scheduler and a.use_checkpoint_opt_param_scheduler),
             "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler both set: "
             "keep one")
    if a.lr_warmup_fraction is not None:
        _require(0.0 <= a.lr_warmup_fraction < 1.0, "--lr-warmup-fraction must lie in [0, 1)")
    _require(a.lr_warmup_iters >= 0, "--lr-warmup-iters must be >= 0")
    _require(0 <= a.adam_beta1 < 1 and 0 <= a.adam_beta2 < 1, "Adam betas must lie in [0, 1)")
    _require(a.adam_eps > 0 and a.weight_decay >= 0 and a.clip_grad >= 0,
             "need --adam-eps > 0, --weight-decay >= 0, --clip-grad >= 0")
    _require(not (a.bf16 and a.fp16), "--bf16 and --fp16 both set: pick one")
    _require((a.loss_scale is None or a.loss_scale > 0) and a.initial_loss_scale > 0
             and 0 < a.min_loss_scale <= a.initial_loss_scale and a.loss_scale_window >= 1
             and a.hysteresis >= 1,
             "need --loss-scale > 0, 0 < --min-loss-scale <= --initial-loss-scale, "
             "--loss-scale-window >= 1 and --hysteresis >= 1")


def _check_fim(a) -> None:
    if not a.fim_data:
        return
    _require(not a.mock_data, "--fim-data rearranges the text of --data-path's documents, and "
             "--mock-data has none (Megatron-LM refuses the two together too): give --data-path")
    _require(a.tokenizer_type != "NullTokenizer",
             "--fim-data cuts the samples' text, and NullTokenizer's ids have no text: use a "
             "tokenizer with the FIM tokens in its vocabulary")
    for flag, rate in (("--fim-rate", a.fim_rate), ("--fim-spm-rate", a.fim_spm_rate),
                       ("--fim-fragment-rate", a.fim_fragment_rate)):
        _require(rate is None or 0.0 <= rate <= 1.0,
                 f"{flag} {rate} is a probability: give a number in [0, 1]")
    _require(a.fim_split_sample is None or a.fim_fragment_rate is not None,
             "--fim-split-sample cuts segments into fragments, each rearranged with probability "
             "--fim-fragment-rate: give it")


def _check_data(a) -> None:
    _require(bool(a.data_path) != a.mock_data,
             "give exactly one data source: --data-path PREFIX (or W1 P1 W2 P2 ...) or --mock-data")
    if a.mock_data:
        _require(a.vocab_size is not None or a.tokenizer_model is not None,
                 "--mock-data needs --vocab-size (or a --tokenizer-model to take it from)")
    else:
        _require(a.tokenizer_type is not None,
                 "--data-path needs --tokenizer-type (e.g. GPTSentencePieceTokenizer) and "
                 "--tokenizer-model")
        if a.tokenizer_type == "NullTokenizer":
            _require(a.vocab_size is not None, "NullTokenizer needs --vocab-size")
        elif a.tokenizer_type == "GPT2BPETokenizer":
            _require(a.vocab_file is not None and a.merge_file is not None,
                     "GPT2BPETokenizer needs --vocab-file and --merge-file")
        else:
            _require(a.tokenizer_model is not None, f"{a.tokenizer_type} needs --tokenizer-model")
        if len(a.data_path) > 1:
            _require(len(a.data_path) % 2 == 0,
                     "--data-path with several prefixes is a blend W1 P1 W2 P2 ...: give a weight "
                     "before each prefix")
    try:
        weights = [float(x) for x in a.split.replace(" ", "").split(",")]
    except ValueError:
        weights = []
    well_formed = len(weights) in (2, 3) and all(w >= 0 for w in weights) and sum(weights) > 0
    _require(well_formed and (weights[1] > 0 or a.eval_iters == 0),
             f"--split {a.split!r} must be train,valid,test weights with a validation part "
             "(e.g. 969,30,1), or pass --eval-iters 0 to run without evaluation")
    if a.vocab_size is not None:
        _require(a.vocab_size >= 2, "--vocab-size must be >= 2")
    _require(a.num_workers >= 0, f"--num-workers must be >= 0, got {a.num_workers}")


def _check_io_and_logging(a) -> None:
    _require(a.save_interval is None or a.save_interval >= 1, "--save-interval must be >= 1")
    _require(not (a.save_interval and not a.save),
             "--save-interval needs --save DIR (where to write the checkpoints)")
    if a.save_retain_interval is not None:
        _require(a.save_retain_interval > 0 and a.save_interval
                 and a.save_retain_interval % a.save_interval == 0,
                 f"--save-retain-interval {a.save_retain_interval} must be a positive multiple of "
                 f"--save-interval ({a.save_interval}), as Megatron-LM requires")
    _require(not (a.exit_signal_handler and not a.save),
             "--exit-signal-handler saves on SIGTERM and needs --save DIR")
    _require(not (a.finetune and not a.load), "--finetune needs --load DIR")
    _require(not a.overlap_param_gather or a.use_distributed_optimizer,
             "--overlap-param-gather overlaps the distributed optimizer's all-gather: add "
             "--use-distributed-optimizer (as in Megatron-LM)")
    _require(a.log_interval >= 1 and a.eval_interval >= 1 and a.eval_iters >= 0,
             "need --log-interval >= 1, --eval-interval >= 1, --eval-iters >= 0")
    _require(a.exit_interval is None or a.exit_interval >= 1, "--exit-interval must be >= 1")
    _require(a.tensorboard_log_interval >= 1 and a.tensorboard_queue_size >= 1,
             "need --tensorboard-log-interval >= 1 and --tensorboard-queue-size >= 1")
    _require(a.manual_gc_interval >= 0, "--manual-gc-interval must be >= 0 (0: no collections "
             "between steps)")
    if a.profile:
        _require(0 <= a.profile_step_start < a.profile_step_end,
                 "--profile needs 0 <= --profile-step-start < --profile-step-end")
        _require(not a.use_pytorch_profiler or a.tensorboard_dir,
                 "--use-pytorch-profiler writes its trace into --tensorboard-dir: give one")
    _require(a.exit_duration_in_mins is None or a.exit_duration_in_mins > 0,
             "--exit-duration-in-mins must be > 0")
    tracker = a.result_rejected_tracker_filename
    if tracker is not None:  # megatron-core's machine appends to it; it fails late otherwise
        folder = os.path.dirname(os.path.abspath(tracker))
        _require(not os.path.isdir(tracker) and os.path.isdir(folder)
                 and os.access(tracker if os.path.exists(tracker) else folder, os.W_OK),
                 f"--result-rejected-tracker-filename {tracker}: not a file this run can append "
                 "to (a directory, a missing folder, or not writable); name a writable file")


def parse_args(argv=None):
    """Parse and check the flags; add ``args.stage`` (a StagePlan). Raises ArgumentError."""
    args = build_parser().parse_args(argv)
    refused = megatron_lm_flags.refused_message(args)
    _require(refused is None, str(refused))
    no_op = megatron_lm_flags.accepted_without_effect(args)
    if no_op:
        warnings.warn("accepted without effect (see --help): " + " ".join(no_op))
    megatron_lm_flags.strip(args)
    _require(args.ckpt_format in ("torch_dist", "torch"),
             f"--ckpt-format {args.ckpt_format}: Megatron-LM writes it only with its FSDP "
             "implementations, which this project does not have; use torch_dist (the default) or "
             "torch")
    _require(args.rerun_mode != "report_stats",
             "--rerun-mode report_stats: megatron-core 0.16.1's rerun state machine cannot report "
             "its statistics (Megatron-LM core_v0.16.1 does not start with it either); use "
             "validate_results (the default) or disabled")
    _require(args.error_injection_rate >= 0,
             f"--error-injection-rate {args.error_injection_rate}: give 0 (no injection) or N > 0 "
             "(one rejected result every N validations)")
    _require(args.context_parallel_size == 1,
             "--context-parallel-size > 1 is not implemented in patch-megatron yet (megatron-core "
             "runs it only through Transformer Engine's attention); use tensor or pipeline "
             "parallelism")
    if args.use_rotary_position_embeddings:
        args.position_embedding_type = "rope"  # Megatron-LM's legacy spelling
    if args.tensor_model_parallel_size == 1 and args.sequence_parallel:
        # As in Megatron-LM: sequence parallelism is meaningless without tensor parallelism.
        warnings.warn("--sequence-parallel is turned off: --tensor-model-parallel-size is 1")
        args.sequence_parallel = False
    _check_model(args)
    _check_wandb(args)
    _check_patch_and_length(args)
    _check_rampup_flags(args)
    _check_optimizer(args)
    _check_data(args)
    _check_fim(args)
    _check_io_and_logging(args)
    _check_est(args)
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.global_batch_size is not None and args.rampup_batch_size is None:
        args.stage = stage_plan(args)
        _check_stage(args)
    else:
        # Known once the data-parallel size is (check_world_size); a ramp's steps are counted
        # there by megatron-core's calculator, which parsing does not import.
        args.stage = None
    return args


def _check_est(a) -> None:
    """EST's schedule and whether this model/TP/PP layout can keep equal per-rank counts."""
    from patch_megatron.est.arguments import est_config_from_args
    from patch_megatron.est.sampler import Layout, check_layout

    try:
        config = est_config_from_args(a)
        if config.enabled:
            _require(a.transformer_impl != "transformer_engine",
                     "--est builds its layers on megatron-core's local ones: use --transformer-impl "
                     "local or leave it out")
            _require(a.swiglu and not a.add_bias_linear and not a.add_qkv_bias,
                     "--est samples units of SwiGLU MLPs without biases: add --swiglu "
                     "--disable-bias-linear")
            _require(a.virtual_pipeline_model_parallel_size is None,
                     "--est with an interleaved pipeline schedule is not implemented yet: drop "
                     "--num-layers-per-virtual-pipeline-stage/--num-virtual-stages-per-pipeline-rank")
            uneven = [f"--decoder-{end}-pipeline-num-layers" for end in ("first", "last")
                      if getattr(a, f"decoder_{end}_pipeline_num_layers") is not None]
            uneven += [f"--account-for-{part}-in-pipeline-split" for part in ("embedding", "loss")
                       if getattr(a, f"account_for_{part}_in_pipeline_split")]
            _require(not uneven, f"--est drops the same number of layers on every pipeline "
                     f"stage, which {' and '.join(uneven)} make unequal: split --num-layers "
                     "evenly over the stages")
            layout = Layout(a.tensor_model_parallel_size, a.pipeline_model_parallel_size)
            check_layout(model_shape(a), layout, config.gqa_sampling)
    except ValueError as error:
        raise ArgumentError(str(error)) from None


def _check_stage(a) -> None:
    s = a.stage
    _require(s.train_iters >= 1,
             f"the {s.name} stage gets no full step of {s.tokens_per_step} tokens from --train-tokens "
             f"{a.train_tokens} at λ={a.patch_data_fraction}: raise --train-tokens or lower "
             "--global-batch-size")
    # With a ramp a step is not a fixed number of samples: the schedule is named in samples.
    warmup, decay = ((f"{s.lr_warmup_samples} samples", f"{s.lr_decay_samples} samples")
                     if s.rampup_batch_size else
                     (f"{s.lr_warmup_iters} steps ({s.lr_warmup_samples} samples)",
                      f"{s.lr_decay_iters} steps"))
    _require(s.lr_warmup_samples < s.lr_decay_samples or s.lr_decay_samples == 0
             or a.lr_decay_style == "constant",
             f"warmup of {warmup} does not fit in the {s.name} stage's {decay} of decay: lower "
             "--lr-warmup-iters/-samples/-fraction")


def _check_installed(a) -> None:
    """What this machine must have for the flags (not in parse_args: a command may be
    parsed on another machine, e.g. by tools/pretrain_two_stage.py --dry-run)."""
    from patch_megatron.model.spec import have_transformer_engine

    _require(a.transformer_impl != "transformer_engine" or have_transformer_engine(),
             "--transformer-impl transformer_engine: Transformer Engine is not installed here; "
             "install it (transformer_engine[pytorch]) or use --transformer-impl local")
    _require(not a.wandb_project or importlib.util.find_spec("wandb") is not None,
             "--wandb-project: Weights & Biases is not installed here; pip install wandb, or "
             "drop the --wandb-* flags")


def check_world_size(args, world_size: int | None = None) -> int:
    """Check the batch against the data-parallel size and what this machine has; fill in
    defaults. Returns the DP size."""
    _check_installed(args)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    _require(world_size % model_parallel == 0,
             f"{world_size} processes cannot hold tensor x pipeline parallel size {model_parallel}: "
             f"launch a multiple of {model_parallel} processes")
    dp = world_size // model_parallel
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
        _check_patch_and_length(args)
    if args.rampup_batch_size is not None:
        _check_rampup(args, dp)
    if args.stage is None:
        args.stage = stage_plan(args)
        _check_stage(args)
    per_step = args.micro_batch_size * dp
    _require(args.stage.global_batch_size % per_step == 0,
             f"the {args.stage.name} stage's global batch of {args.stage.global_batch_size} samples "
             f"is not divisible by micro-batch-size x data-parallel size = "
             f"{args.micro_batch_size} x {dp}: change --global-batch-size or --micro-batch-size")
    if args.virtual_pipeline_model_parallel_size is not None:
        _check_interleaved_micro_batches(args, args.stage.global_batch_size // per_step, "a step")
        if args.rampup_batch_size is not None:
            start, increment, _ = args.rampup_batch_size
            for batch in range(start, args.stage.global_batch_size, increment):
                _check_interleaved_micro_batches(args, batch // per_step,
                                                 f"the ramp's step of {batch} samples")
    return dp


def print_arguments(args, file=None) -> None:
    """The parsed flags, as Megatron-LM prints them at start-up."""
    print("------------------------ arguments ------------------------", file=file)
    lines = [f"  {name} {'.' * (48 - len(name))} {value}" for name, value in vars(args).items()]
    for line in sorted(lines, key=str.lower):
        print(line, file=file)
    print("-------------------- end of arguments ---------------------", file=file, flush=True)


def num_microbatches(args, dp: int) -> int:
    """Micro-batches of a step of the full global batch (a ramp's last; every evaluation's)."""
    return args.stage.global_batch_size // (args.micro_batch_size * dp)


def activation_name(args) -> str:
    return "swiglu" if args.swiglu else "squared_relu" if args.squared_relu else "gelu"


def model_shape(args, vocab_size: int | None = None) -> ModelShape:
    """The shape the flags describe, with the tokenizer's ``vocab_size`` padded as Megatron-LM
    pads it (None: not known yet, as when the flags are parsed)."""
    rows = None if vocab_size is None else padded_vocab_size(
        vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
    return ModelShape(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        vocab_size=rows,
        ffn_hidden_size=args.ffn_hidden_size,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels,
        normalization=args.normalization,
        apply_layernorm_1p=args.apply_layernorm_1p,
        activation=activation_name(args),
        add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_interleaved=args.rotary_interleaved,
        qk_layernorm=args.qk_layernorm,
        max_position_embeddings=args.max_position_embeddings or args.seq_length,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
    )
