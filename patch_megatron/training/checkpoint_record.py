"""What a checkpoint's ``common.pt`` holds besides tensors: one typed, versioned record.

pretrain_patch_gpt.py, the converters and the two-stage runner read and write
these records through this module only (``CheckpointRecord``, ``to_common``,
``read_record``).

On disk (schema 2) ``common.pt`` is what Megatron-LM's ``save_checkpoint``
writes, so that its ``load_checkpoint`` resumes our runs:

- ``args``: an ``argparse.Namespace`` of the run's flags under Megatron-LM's
  names (this project's flags have them), plus what Megatron-LM keeps there:
  the data position ``consumed_train_samples``, ``padded_vocab_size``, the
  world and data-parallel sizes. It holds plain values only; megatron-core
  registers ``Namespace`` with torch, so it loads with ``weights_only=True``.
- ``iteration``, ``checkpoint_version`` (3.0), ``opt_param_scheduler`` (its
  steps counted in samples, as Megatron-LM counts them),
  ``num_floating_point_operations_so_far``;
- ``content_metadata`` (written by ``dist_checkpointing.save``, see
  ``content_metadata``): how the distributed optimizer's state is sharded.

What Megatron-LM has no name for sits in one dict under ``patch_megatron``
(``SCHEMA_VERSION``, patch size, the model-shape record, ...); Megatron-LM
ignores it.

Three kinds of ``common.pt`` are read:

- schema 2, this module's;
- schema 1, this project's checkpoints before it: the same facts at the top
  level, ``args`` a dict, the scheduler counted in iterations (converted to
  samples here) and RNG states that are not read back;
- Megatron-LM's own (no ``patch_megatron`` entry): the model shape comes from
  its ``args``, and it is a token-level model (patch size 1).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace

import torch

from patch_megatron.model.shape import LLAMA_SHAPE_ARCHITECTURE, ModelShape
from patch_megatron.stage import Stage

SCHEMA_VERSION = 2
MEGATRON_CHECKPOINT_VERSION = 3.0
OWN_KEY = "patch_megatron"

# The numbers that fix the parameters' shapes: what must match between a
# checkpoint and the model loading it.
SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "num_query_groups", "vocab_size", "untie_embeddings_and_output_weights")

# What the parameters compute (and which of them exist): PatchGPTConfig's architecture fields.
# Records written before these were recorded (schema 1, early schema 2) hold LLaMA models,
# the only architecture this project then built; records that predate rotary_interleaved and
# qk_layernorm hold neither (both were refused then), which LLaMA's values say too.
ARCHITECTURE_KEYS = ("kv_channels", "normalization", "apply_layernorm_1p", "activation",
                     "add_bias_linear", "add_qkv_bias", "position_embedding_type", "rotary_percent",
                     "rotary_interleaved", "qk_layernorm")
LLAMA_ARCHITECTURE = {k: v for k, v in LLAMA_SHAPE_ARCHITECTURE.items() if k in ARCHITECTURE_KEYS}
MODEL_KEYS = SHAPE_KEYS + ARCHITECTURE_KEYS


def complete_model_shape(shape: dict) -> ModelShape:
    """A recorded model shape, with the architecture of records that predate it filled in."""
    if not isinstance(shape, dict):
        raise RecordError(f"the recorded model shape is a {type(shape).__name__}, not a dict: "
                          "the checkpoint is damaged")
    full = {**LLAMA_ARCHITECTURE, **shape}
    try:
        return ModelShape(**{k: full.get(k) for k in MODEL_KEYS})
    except (TypeError, ValueError) as error:
        raise RecordError(f"the recorded model shape is invalid ({error}): the checkpoint is "
                          "damaged") from None


def shape_record(shape: ModelShape) -> dict:
    """What ``common.pt`` records of a model shape: plain values under MODEL_KEYS."""
    return {k: getattr(shape, k) for k in MODEL_KEYS}

# The scheduler's step counts: samples, as Megatron-LM's (schema 1 counted iterations).
_SCHEDULER_STEP_KEYS = ("num_steps", "lr_warmup_steps", "lr_decay_steps", "wd_incr_steps",
                        "wsd_decay_steps")

LOCAL_OPTIMIZER = "local"  # megatron's plain optimizer: its state sharded like the model
DISTRIBUTED_OPTIMIZER = "dp_reshardable"  # the distributed optimizer's shards as held


class RecordError(ValueError):
    """A ``common.pt`` that is not a checkpoint of a known kind; the message says why."""


def _plain(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return isinstance(value, (int, float, str, bool, type(None)))


def plain_flags(namespace_or_dict) -> dict:
    """The flags as plain values (what loads with ``weights_only=True``, in any torch)."""
    items = namespace_or_dict if isinstance(namespace_or_dict, dict) else vars(namespace_or_dict)
    return {k: _plain_value(v) for k, v in items.items() if _plain(v)}


def _plain_value(value):
    if isinstance(value, (list, tuple)):
        return [_plain_value(v) for v in value]
    if isinstance(value, str):
        return str(value)  # a str subclass (an enum such as Stage) pickles as its class
    return value


@dataclass(frozen=True)
class CheckpointRecord:
    """Everything a checkpoint says about itself, apart from its tensors."""

    iteration: int
    patch_size: int  # K: 1 for a token-level model
    model_shape: ModelShape  # or its record (a MODEL_KEYS dict); vocab_size: padded rows
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    flags: dict = field(default_factory=dict)  # the run's flags, Megatron-LM's names
    consumed_train_samples: int = 0  # samples of this stage's train set read (data position)
    skipped_iters: int = 0
    nan_iters: int = 0
    # How the optimizer state is stored (LOCAL_OPTIMIZER, DISTRIBUTED_OPTIMIZER or another of
    # megatron's names); None: the checkpoint holds none.
    optimizer_format: str | None = LOCAL_OPTIMIZER
    # OptimizerParamScheduler.state_dict() with its steps counted in samples, Megatron-LM's unit.
    scheduler: dict | None = None
    has_rng: bool = True  # holds Megatron-LM's ``rng_state`` object
    flops_so_far: float = 0.0
    weights_only: bool = False  # a converter's output: load the weights and start afresh
    data_position: dict | None = None  # a handoff's: where the patch stage stopped reading
    converted_from: dict | None = None
    source: str = "patch-megatron"  # or "megatron-lm"
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        if not isinstance(self.model_shape, ModelShape):
            object.__setattr__(self, "model_shape", complete_model_shape(self.model_shape))

    # What readers need from the saved flags, each with the default it had when absent.
    @property
    def stage(self) -> Stage:
        return Stage.of(self.patch_size)

    @property
    def layout(self) -> tuple[int, int]:
        return self.tensor_model_parallel_size, self.pipeline_model_parallel_size

    @property
    def seq_length(self) -> int | None:
        return self.flags.get("seq_length")

    @property
    def global_batch_size(self) -> int | None:
        return self.flags.get("global_batch_size")

    @property
    def data_parallel_size(self) -> int | None:
        return self.flags.get("data_parallel_size")

    @property
    def max_position_embeddings(self) -> int | None:
        return self.flags.get("max_position_embeddings") or self.seq_length

    @property
    def rotary_base(self) -> float:
        return self.flags.get("rotary_base", 10000)

    @property
    def norm_epsilon(self) -> float:
        return self.flags.get("norm_epsilon", 1e-5)

    @property
    def make_vocab_size_divisible_by(self) -> int:
        return self.flags.get("make_vocab_size_divisible_by", 128)

    @property
    def params_dtype(self) -> torch.dtype:
        if self.flags.get("bf16"):
            return torch.bfloat16
        if self.flags.get("fp16"):
            return torch.float16
        return torch.float32

    def with_flags(self, **changes) -> "CheckpointRecord":
        return replace(self, flags={**self.flags, **changes})


# ---------------------------------------------------------------------------
# Writing.

def content_metadata(record: CheckpointRecord) -> dict:
    """What Megatron-LM passes to ``dist_checkpointing.save`` as content metadata."""
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if record.optimizer_format not in (None, LOCAL_OPTIMIZER):
        metadata["distrib_optim_sharding_type"] = record.optimizer_format
    return metadata


def megatron_args(record: CheckpointRecord, ckpt_format: str = "torch_dist") -> argparse.Namespace:
    """``args`` as Megatron-LM's loader reads it: our flags plus its bookkeeping attributes."""
    flags = dict(record.flags)
    shape = record.model_shape
    flags.update(
        kv_channels=shape.kv_channels,
        normalization=shape.normalization,
        layernorm_zero_centered_gamma=shape.apply_layernorm_1p,
        apply_layernorm_1p=shape.apply_layernorm_1p,
        swiglu=shape.activation == "swiglu",
        squared_relu=shape.activation == "squared_relu",
        add_bias_linear=shape.add_bias_linear,
        add_qkv_bias=shape.add_qkv_bias,
        position_embedding_type=shape.position_embedding_type,
        rotary_percent=shape.rotary_percent,
        rotary_interleaved=shape.rotary_interleaved,
        qk_layernorm=shape.qk_layernorm,
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        padded_vocab_size=shape.vocab_size,
        untie_embeddings_and_output_weights=shape.untie_embeddings_and_output_weights,
        tensor_model_parallel_size=record.tensor_model_parallel_size,
        pipeline_model_parallel_size=record.pipeline_model_parallel_size,
        consumed_train_samples=record.consumed_train_samples,
        skipped_train_samples=0,
        consumed_valid_samples=0,  # validation re-reads the same first batches each time
        no_save_optim=record.optimizer_format is None,
        no_save_rng=not record.has_rng,
        ckpt_format=ckpt_format,
        ckpt_fully_parallel_save=False,
        use_distributed_optimizer=record.optimizer_format == DISTRIBUTED_OPTIMIZER,
    )
    # Megatron-LM's --no-position-embedding (default: True, whatever the position type).
    flags.setdefault("add_position_embedding", not flags.get("no_position_embedding", False))
    flags.setdefault("world_size", (record.data_parallel_size or 1)
                     * record.tensor_model_parallel_size * record.pipeline_model_parallel_size)
    return argparse.Namespace(**flags)


def to_common(record: CheckpointRecord, ckpt_format: str = "torch_dist") -> dict:
    """``common.pt``'s entries for ``record`` (the sharded tensors are added by the caller);
    in the legacy ``torch`` format, every rank file's non-tensor entries."""
    common = {
        "args": megatron_args(record, ckpt_format),
        "checkpoint_version": MEGATRON_CHECKPOINT_VERSION,
        "iteration": record.iteration,
        "num_floating_point_operations_so_far": float(record.flops_so_far),
        OWN_KEY: {
            "schema_version": SCHEMA_VERSION,
            "patch_size": record.patch_size,
            "model_shape": shape_record(record.model_shape),
            "skipped_iters": record.skipped_iters,
            "nan_iters": record.nan_iters,
            "optimizer_format": record.optimizer_format,
            "weights_only": record.weights_only,
            "data_position": record.data_position,
            "converted_from": record.converted_from,
        },
    }
    if record.scheduler is not None:
        common["opt_param_scheduler"] = dict(record.scheduler)
    return common


# ---------------------------------------------------------------------------
# Reading.

def read_record(common: dict, path: str) -> CheckpointRecord:
    """The record of ``common.pt``'s dict, whichever kind wrote it (see the module docstring)."""
    if not isinstance(common, dict):
        raise RecordError(f"{path}: common.pt holds a {type(common).__name__}, not a dict")
    if isinstance(common.get(OWN_KEY), dict):
        return _read_schema_2(common, path)
    if "model_shape" in common:
        return _read_schema_1(common, path)
    if isinstance(common.get("args"), argparse.Namespace):
        return _read_megatron_lm(common, path)
    raise RecordError(f"{path} records neither this project's checkpoint record nor Megatron-LM's "
                      "args: it was not written by pretrain_patch_gpt.py, its converters or "
                      "Megatron-LM, so its model is unknown")


def _read_schema_2(common: dict, path: str) -> CheckpointRecord:
    own = common[OWN_KEY]
    if own.get("schema_version", 0) > SCHEMA_VERSION:
        raise RecordError(f"{path} was written by a newer patch-megatron (checkpoint schema "
                          f"{own['schema_version']}, this one reads up to {SCHEMA_VERSION}): "
                          "upgrade patch-megatron to load it")
    args = plain_flags(common["args"])
    return CheckpointRecord(
        iteration=int(common.get("iteration", 0)),
        patch_size=int(own["patch_size"]),
        model_shape=complete_model_shape(own["model_shape"]),
        tensor_model_parallel_size=int(args.get("tensor_model_parallel_size", 1)),
        pipeline_model_parallel_size=int(args.get("pipeline_model_parallel_size", 1)),
        flags=args,
        consumed_train_samples=int(args.get("consumed_train_samples", 0)),
        skipped_iters=int(own.get("skipped_iters", 0)),
        nan_iters=int(own.get("nan_iters", 0)),
        optimizer_format=own.get("optimizer_format"),
        scheduler=common.get("opt_param_scheduler"),
        has_rng=not args.get("no_save_rng", False),
        flops_so_far=float(common.get("num_floating_point_operations_so_far", 0.0)),
        weights_only=bool(own.get("weights_only")),
        data_position=own.get("data_position"),
        converted_from=own.get("converted_from"),
        schema_version=int(own["schema_version"]),
    )


def scheduler_in_samples(scheduler: dict | None, global_batch_size: int) -> dict | None:
    """A scheduler state counted in iterations (schema 1), counted in samples."""
    if scheduler is None:
        return None
    return {k: (v * global_batch_size if k in _SCHEDULER_STEP_KEYS and v is not None else v)
            for k, v in scheduler.items()}


def _read_schema_1(common: dict, path: str) -> CheckpointRecord:
    shape, args = common.get("model_shape"), common.get("args")
    if not isinstance(shape, dict) or not isinstance(args, dict) or "patch_size" not in common:
        raise RecordError(f"{path} has an incomplete record (model shape, args and patch size "
                          "are needed): it is damaged")
    layout = common.get("layout") or {}
    weights_only = bool(common.get("weights_only"))
    gbs = args.get("global_batch_size") or 1
    return CheckpointRecord(
        iteration=int(common.get("iteration", 0)),
        patch_size=int(common["patch_size"]),
        model_shape=complete_model_shape({k: shape.get(k) for k in SHAPE_KEYS}),
        tensor_model_parallel_size=int(layout.get("tensor_model_parallel_size", 1)),
        pipeline_model_parallel_size=int(layout.get("pipeline_model_parallel_size", 1)),
        flags=plain_flags(args),
        consumed_train_samples=int(common.get("consumed_train_samples", 0)),
        skipped_iters=int(common.get("skipped_iters", 0)),
        nan_iters=int(common.get("nan_iters", 0)),
        optimizer_format=None if weights_only else common.get("optimizer_format", LOCAL_OPTIMIZER),
        scheduler=scheduler_in_samples(common.get("opt_param_scheduler"), gbs),
        has_rng=False,  # schema 1 stored RNG states as tensors; a resume reseeds instead
        weights_only=weights_only,
        data_position=common.get("data_position"),
        converted_from=common.get("converted_from"),
        schema_version=1,
    )


def _read_megatron_lm(common: dict, path: str) -> CheckpointRecord:
    args = common["args"]
    missing = [n for n in ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size")
               if getattr(args, n, None) is None]
    if missing:
        raise RecordError(f"{path}: Megatron-LM's args lack {', '.join(missing)}, so the model's "
                          "shape is unknown")
    heads = args.num_attention_heads
    groups = args.num_query_groups if getattr(args, "group_query_attention", False) else heads
    ffn = getattr(args, "ffn_hidden_size", None) or 4 * args.hidden_size
    metadata = common.get("content_metadata") or {}
    if getattr(args, "no_save_optim", False):
        optimizer_format = None
    elif getattr(args, "use_distributed_optimizer", False) and getattr(args, "ckpt_format",
                                                                        None) == "torch":
        # The legacy format's distrib_optim.pt: gathered per TP x PP rank, so like
        # dp_reshardable it loads at another data-parallel size but not another TP/PP.
        optimizer_format = DISTRIBUTED_OPTIMIZER
    elif getattr(args, "use_distributed_optimizer", False):
        # Before megatron-core 0.13 no content metadata was written; Megatron-LM then assumes:
        optimizer_format = metadata.get("distrib_optim_sharding_type") or (
            "fully_sharded_model_space" if getattr(args, "ckpt_fully_parallel_save", False)
            else "dp_zero_gather_scatter")
    else:
        optimizer_format = LOCAL_OPTIMIZER
    flags = plain_flags(args)
    return CheckpointRecord(
        iteration=int(common.get("iteration", 0)),
        patch_size=1,
        model_shape={
            "num_layers": args.num_layers,
            "hidden_size": args.hidden_size,
            "ffn_hidden_size": ffn,
            "num_attention_heads": heads,
            "num_query_groups": groups,
            "vocab_size": args.padded_vocab_size,
            "untie_embeddings_and_output_weights":
                bool(getattr(args, "untie_embeddings_and_output_weights", False)),
            "kv_channels": getattr(args, "kv_channels", None) or args.hidden_size // heads,
            "normalization": getattr(args, "normalization", "LayerNorm"),
            # --apply-layernorm-1p: layernorm_zero_centered_gamma since the flags come from
            # TransformerConfig's fields; older Megatron-LM named it after the flag.
            "apply_layernorm_1p": bool(getattr(args, "layernorm_zero_centered_gamma",
                                               getattr(args, "apply_layernorm_1p", False))),
            "activation": ("swiglu" if getattr(args, "swiglu", False) else
                           "squared_relu" if getattr(args, "squared_relu", False) else "gelu"),
            "add_bias_linear": bool(getattr(args, "add_bias_linear", True)),
            "add_qkv_bias": bool(getattr(args, "add_qkv_bias", False)),
            "position_embedding_type": getattr(args, "position_embedding_type",
                                               "learned_absolute"),
            "rotary_percent": float(getattr(args, "rotary_percent", 1.0)),
            "rotary_interleaved": bool(getattr(args, "rotary_interleaved", False)),
            "qk_layernorm": bool(getattr(args, "qk_layernorm", False)),
        },
        tensor_model_parallel_size=int(getattr(args, "tensor_model_parallel_size", 1)),
        pipeline_model_parallel_size=int(getattr(args, "pipeline_model_parallel_size", 1)),
        flags=flags,
        consumed_train_samples=int(getattr(args, "consumed_train_samples", 0) or 0),
        optimizer_format=optimizer_format,
        scheduler=common.get("opt_param_scheduler"),
        has_rng=not getattr(args, "no_save_rng", False),
        flops_so_far=float(common.get("num_floating_point_operations_so_far", 0) or 0),
        source="megatron-lm",
        schema_version=0,
    )


def describe(record: CheckpointRecord) -> str:
    """One line naming what wrote the checkpoint (for messages)."""
    if record.source == "megatron-lm":
        return "a Megatron-LM checkpoint"
    if record.schema_version < SCHEMA_VERSION:
        return f"a patch-megatron checkpoint of schema {record.schema_version}"
    return "a patch-megatron checkpoint"

