"""Megatron-LM flags this project accepts without effect, and those it refuses with a reason.

Every flag of ``pretrain_patch_gpt.py`` is one of three kinds, and
``tests/training/test_flag_table.py`` walks the parser to keep it so:

* **honoured**: it means what it means in Megatron-LM (the other groups of ``--help``);
* **accepted without effect** (``NO_OP``): a switch that cannot change what is
  trained here, because it picks a fused kernel this project never runs, an I/O
  strategy that writes the same checkpoint, or a log line this project does not
  print; given ones are named in the run's log;
* **refused** (``REFUSED``): parsed only so that the error can say why and what
  to do instead, because honouring it silently wrong would train another run.

A Megatron-LM flag in none of these is refused by argparse as unrecognised.
"""

from __future__ import annotations

import argparse

_FUSION = "a kernel-fusion switch; this project runs no fused path it would turn off"
_CKPT_IO = "a checkpoint I/O strategy; the files written and read are the same"
_NOT_LOGGED = "a logging switch; this log line is not printed here (training is unchanged)"
_ALWAYS_ON_THE_BOARD = ("an older Megatron-LM spelling (core_v0.16.1 has no such flag): with "
                        "--tensorboard-dir this scalar is always written, as there")

_ONLY_WITH_CP = ("read only with --context-parallel-size > 1, which is refused here; at 1 it "
                 "changes nothing")

NO_OP = {
    "--use-mcore-models": "megatron-core's models are the only ones here (deprecated in Megatron-LM)",
    "--no-gradient-accumulation-fusion": _FUSION,
    "--no-masked-softmax-fusion": _FUSION,
    "--no-bias-gelu-fusion": _FUSION,
    "--no-bias-swiglu-fusion": _FUSION,
    "--no-bias-dropout-fusion": _FUSION,
    "--no-rope-fusion": _FUSION,
    "--no-persist-layer-norm": _FUSION,
    "--cross-entropy-loss-fusion": "the loss is this project's vocab-parallel patch loss, unfused",
    "--attention-backend": "local layers run torch's scaled_dot_product_attention, Transformer "
                           "Engine layers TE's own choice",
    "--distributed-backend": "NCCL on GPUs and gloo in CPU mode, as megatron-core needs",
    "--async-save": "checkpoints are written synchronously: the same files, the step waits",
    "--ckpt-fully-parallel-load": _CKPT_IO,
    "--ckpt-fully-parallel-save": _CKPT_IO,
    "--no-ckpt-fully-parallel-save": _CKPT_IO,
    "--ckpt-assume-constant-structure": _CKPT_IO,
    "--use-persistent-ckpt-worker": _CKPT_IO,
    "--dist-ckpt-optim-fully-reshardable": "the distributed optimizer is saved dp_reshardable "
                                           "(Megatron-LM's default): it resumes at any "
                                           "data-parallel size, and a resume at another TP/PP is "
                                           "refused with the fix",
    "--auto-detect-ckpt-format": "checkpoints here are torch_dist, which the loader reads",
    "--no-use-tokenizer-model-from-checkpoint-args": "the tokenizer always comes from the flags",
    "--no-create-attention-mask-in-dataloader": "the causal mask is the kernel's; no mask tensor "
                                                "is built",
    "--no-mmap-bin-files": "the same tokens, read through megatron-core's indexed dataset",
    "--calculate-per-token-loss": "the loss is always the mean over the global batch's scored "
                                  "tokens here",
    "--empty-unused-memory-level": "memory housekeeping only",
    "--use-cpu-initialization": "where the initial weights are drawn (CPU mode: on the CPU); the "
                                "same distribution",
    "--disable-gloo-process-groups": "process groups are created as megatron-core needs them",
    "--check-weight-hash-across-dp-replicas-interval": "a consistency check, not performed here",
    "--straggler-minmax-count": "straggler reporting, not performed here",
    "--log-learning-rate-to-tensorboard": _ALWAYS_ON_THE_BOARD,
    "--log-loss-scale-to-tensorboard": _ALWAYS_ON_THE_BOARD + " (--no-log-loss-scale-to-"
                                       "tensorboard leaves it out)",
    "--log-batch-size-to-tensorboard": _ALWAYS_ON_THE_BOARD,
    "--log-progress": _NOT_LOGGED,
    "--timing-log-level": _NOT_LOGGED,
    "--timing-log-option": _NOT_LOGGED,
    "--log-throughput": "tokens/s, TFLOP/s and MFU are always in the log line here",
    "--ddp-average-in-collective": "where the data-parallel mean is taken (in the collective, "
                                   "or by scaling before it), the same mean either way; here "
                                   "gradients are summed and divided once by the global "
                                   "batch's scored tokens",
    "--defer-embedding-wgrad-compute": "when the output layer's weight gradients are computed "
                                       "(during the pipeline flush, with fused weight-gradient "
                                       "accumulation, which does not run here): the same "
                                       "gradients",
    "--wgrad-deferral-limit": "how many micro-batches --defer-embedding-wgrad-compute defers: the "
                              "same gradients",
    "--test-mode": "Megatron-LM's real-time self-checks alongside training, not performed here; "
                   "training is unchanged",
    "--cp-comm-type": _ONLY_WITH_CP,
    "--hierarchical-context-parallel-sizes": _ONLY_WITH_CP,
    "--expert-tensor-parallel-size": "sizes the expert layers' groups; this project's dense "
                                     "models have none (--num-experts is refused)",
}

_NOT_YET = "not implemented in patch-megatron yet"

REFUSED = {
    "--decrease-batch-size-if-needed": "shrinking the global batch to fit the data-parallel size "
                                       "is " + _NOT_YET + "; give a --global-batch-size (and "
                                       "--rampup-batch-size START and INCREMENT) divisible by "
                                       "micro-batch-size x data-parallel size",
    "--overlap-param-gather-with-optimizer-step": "overlapping the parameter all-gather is "
                                                  + _NOT_YET,
    "--use-checkpoint-args": "model flags are not read from the checkpoint; give them on the "
                             "command line (a mismatch is named when loading)",
    "--cuda-graph-impl": "CUDA graphs are " + _NOT_YET,
    "--fp8-format": "fp8 training is " + _NOT_YET + "; use --bf16",
    "--fp8-param-gather": "fp8 training is " + _NOT_YET,
    "--fp8-amax-history-len": "fp8 training is " + _NOT_YET,
    "--fp8-amax-compute-algo": "fp8 training is " + _NOT_YET,
    "--num-experts": "mixture-of-experts layers are " + _NOT_YET + "; this project trains dense "
                     "GPT/LLaMA models",
    "--multi-latent-attention": "multi-latent attention is " + _NOT_YET,
    "--no-check-for-nan-in-loss-and-grad": "NaN/Inf losses, gradients and learning rates are "
                                           "always checked here; --nan-action skip drops such "
                                           "steps instead of stopping",
    "--tokenizer-special-tokens": "extra special tokens are " + _NOT_YET + "; the tokenizer's "
                                  "own are used (add them to the tokenizer's files instead)",
    "--tiktoken-special-tokens": "extra special tokens are " + _NOT_YET + " (Megatron-LM's "
                                 "deprecated spelling of --tokenizer-special-tokens)",
    "--eod-mask-loss": "masking the loss at end-of-document tokens is " + _NOT_YET,
    "--reset-position-ids": "per-document positions are " + _NOT_YET,
    "--reset-attention-mask": "per-document attention masks are " + _NOT_YET,
}


def _dest(kind: str, flag: str) -> str:
    return f"{kind}__{flag.lstrip('-').replace('-', '_')}"


_GROUPS = (
    ("no_op", NO_OP, "Megatron-LM flags accepted without effect",
     "They cannot change what is trained here; the log names the ones given."),
    ("refused", REFUSED, "Megatron-LM flags refused",
     "Honouring them wrongly would train another run; each is refused with this reason."),
)


def add_to_parser(parser: argparse.ArgumentParser) -> None:
    """The two tables as parser groups (each flag takes any values, as its Megatron-LM form does)."""
    for kind, table, title, description in _GROUPS:
        group = parser.add_argument_group(title, description)
        for flag, why in table.items():
            group.add_argument(flag, nargs="*", default=argparse.SUPPRESS,
                               dest=_dest(kind, flag), metavar="VALUE", help=why)


def refused_message(args) -> str | None:
    """The refusal for the first refused flag given, or None."""
    for flag, why in REFUSED.items():
        if hasattr(args, _dest("refused", flag)):
            return f"{flag}: {why}"
    return None


def accepted_without_effect(args) -> list[str]:
    """The no-op flags given."""
    return [flag for flag in NO_OP if hasattr(args, _dest("no_op", flag))]


def strip(args) -> None:
    """Remove the tables' entries, so that the parsed flags hold only honoured ones."""
    for kind, table, _, _ in _GROUPS:
        for flag in table:
            if hasattr(args, _dest(kind, flag)):
                delattr(args, _dest(kind, flag))
