"""Our megatron checkpoints (torch_dist, Megatron-LM layout) as full weights, and back.

The layout is that of ``patch_megatron.training.checkpointing``
(``SAVE/iter_XXXXXXX/``, ``latest_checkpointed_iteration.txt``) and the
non-tensor records are ``patch_megatron.training.checkpoint_record``'s, so
checkpoints of pretrain_patch_gpt.py, of these converters and of Megatron-LM
all read the same way.
Reading builds the model once at TP=1/PP=1 on CPU and lets megatron-core's
``dist_checkpointing.load`` assemble every tensor from whatever TP/PP layout
wrote it. Writing does the reverse from a TP=1/PP=1 model; torch_dist
checkpoints store global tensors, so what one process writes loads at any
TP/PP whose shape constraints hold.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from patch_megatron.conversion.errors import ConversionError
from patch_megatron.conversion.model_description import ModelDescription, from_record
from patch_megatron.model.shape import ModelShape
from patch_megatron.training.checkpoint_record import (
    CheckpointRecord,
    RecordError,
    content_metadata,
    read_record,
    to_common,
)

# Files every complete torch_dist checkpoint directory holds.
_REQUIRED_FILES = ("metadata.json", "common.pt", ".metadata")


@dataclass
class Checkpoint:
    path: str  # the iter_XXXXXXX directory
    iteration: int
    record: CheckpointRecord  # what common.pt says about the checkpoint
    description: ModelDescription

    @property
    def args(self) -> dict:
        """The flags the checkpoint's run was given (Megatron-LM's names)."""
        return self.record.flags


def _iteration_of(directory: str) -> int | None:
    name = os.path.basename(os.path.normpath(directory))
    if name.startswith("iter_") and name[5:].isdigit():
        return int(name[5:])
    return None


def checkpoint_directory(load_dir: str, iteration: int | None = None) -> tuple[str, int]:
    """The iter_XXXXXXX directory to read: the given iteration, else the latest complete one."""
    from patch_megatron.training import checkpointing as ckpt

    if not os.path.isdir(load_dir):
        raise ConversionError(f"--load {load_dir} is not a directory")
    if _iteration_of(load_dir) is not None and iteration is None:
        return load_dir, _iteration_of(load_dir)  # pointed straight at one iteration
    if iteration is not None:
        path = ckpt.iteration_dir(load_dir, iteration)
        if not os.path.isdir(path):
            hint = (" (only an interrupted save of it exists)"
                    if os.path.isdir(path + ckpt.INCOMPLETE_SUFFIX) else "")
            raise ConversionError(f"{load_dir} has no checkpoint of iteration {iteration}{hint}; "
                                  "leave out --iteration to take the latest")
        return path, iteration
    try:
        latest = ckpt.read_latest_iteration(load_dir)
    except ckpt.CheckpointError as error:
        raise ConversionError(str(error)) from None
    if latest is None:
        finished = ckpt.finished_iterations(load_dir)
        if finished:
            raise ConversionError(
                f"{load_dir} holds finished checkpoints but its tracker file {ckpt.LATEST_FILE} "
                f"is missing (deleted?), so which one is the latest is unknown; iterations saved "
                f"there: {', '.join(map(str, finished))}. Pick one with --iteration "
                f"(e.g. --iteration {finished[-1]})")
        partial = [n for n in os.listdir(load_dir) if n.endswith(ckpt.INCOMPLETE_SUFFIX)]
        what = (f"only interrupted saves ({', '.join(sorted(partial))})" if partial
                else "no checkpoint")
        raise ConversionError(f"{load_dir} holds {what}: {ckpt.LATEST_FILE} is missing, so no save "
                              "completed. Point --load at a directory with a finished checkpoint")
    path = ckpt.iteration_dir(load_dir, latest)
    if not os.path.isdir(path):
        raise ConversionError(f"{ckpt.LATEST_FILE} in {load_dir} names iteration {latest}, but "
                              f"{path} is missing: the checkpoint is incomplete")
    return path, latest


def open_checkpoint(load_dir: str, iteration: int | None = None) -> Checkpoint:
    """Locate a checkpoint and read its records (no tensors yet); refuse incomplete ones."""
    from patch_megatron.training import checkpointing as ckpt

    path, found = checkpoint_directory(load_dir, iteration)
    parent = os.path.dirname(os.path.normpath(path))

    def refuse(why: str):
        message = ckpt.refusal(parent, path, found, why,
                               lambda good: f"convert it with --iteration {good}")
        return ConversionError(message)

    # Everything megatron-core and torch would unpickle is checked before they read it,
    # and the files against their checksums.
    common, why = ckpt.inspect_checkpoint(path)
    if why:
        raise refuse(why)
    if ckpt.is_torch_format(path):
        layout = ckpt.torch_format_layout(path)
        if layout != (1, 1):
            raise ConversionError(
                f"checkpoint {path} is in Megatron-LM's legacy torch format, "
                + (f"saved at TP {layout[0]} x PP {layout[1]}" if layout else "with irregular "
                   "rank folders")
                + ": the converters read that format only at TP 1 x PP 1. Re-save it as "
                "torch_dist first: run pretrain_patch_gpt.py with its flags, --load it and "
                "--save elsewhere without --ckpt-format torch, then convert that")
    else:
        missing = [f for f in _REQUIRED_FILES if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise refuse(f"it is incomplete: {', '.join(missing)} missing")
    try:
        record = read_record(common, path)
    except RecordError as error:
        raise ConversionError(str(error)) from None
    return Checkpoint(path, found, record, from_record(record, path))


def _model_at_tp1(description: ModelDescription):
    from patch_megatron.conversion.cpu_world import ensure_world_of_one
    from patch_megatron.model.patch_gpt import build_model

    ensure_world_of_one()
    # The weights do not depend on the patch size; K=1 builds the plain token model.
    return build_model(description.model_config(patch_size=1), pre_process=True,
                       post_process=True, cpu=True)


def _sharded_tensors(model, *, is_loading: bool = True) -> dict:
    """The model's sharded state; on loading without the layers' ``_extra_state`` objects.

    As in pretrain_patch_gpt.py's checkpoints: they are written (Megatron-LM
    asks for them; they are empty for megatron's local layers) but never read.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = model.sharded_state_dict()
    if not is_loading:
        return state
    return {key: value for key, value in state.items()
            if not (isinstance(value, ShardedObject) and key.endswith("_extra_state"))}


def _load_into(model, state: dict) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [n for n in missing if not n.endswith("_extra_state")]
    if missing or unexpected:
        raise ConversionError(f"weights do not fit the model: missing {missing[:5]}, unexpected "
                              f"{list(unexpected)[:5]}")


def _weights_of(model) -> dict:
    return {name: t.detach().clone() for name, t in model.state_dict().items()
            if not name.endswith("_extra_state")}


def load_full_weights(checkpoint: Checkpoint) -> dict:
    """Every weight of the checkpoint as one unsharded tensor, named as at TP=1/PP=1."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    from patch_megatron.training import safe_load

    from patch_megatron.training import checkpointing as ckpt

    model = _model_at_tp1(checkpoint.description)
    if ckpt.is_torch_format(checkpoint.path):  # TP 1 x PP 1 (open_checkpoint): one rank file
        rank_file = os.path.join(ckpt.rank_directory(checkpoint.path, 0, 0, 1),
                                 ckpt.TORCH_FORMAT_FILE)
        _load_into(model, safe_load.read_state_file(rank_file)["model"])
        return _weights_of(model)
    try:
        loaded = dist_checkpointing.load({"model": _sharded_tensors(model)}, checkpoint.path,
                                         common_strategy=safe_load.safe_common_strategy())
    # torch's CheckpointException derives from BaseException, hence named here.
    except (Exception, CheckpointException) as error:  # noqa: BLE001 - a missing or damaged shard
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise ConversionError(f"cannot load the weights of checkpoint {checkpoint.path} "
                              f"({type(error).__name__}: {first_line[:300]}): files are missing or "
                              "damaged. Use another iteration (--iteration)") from None
    _load_into(model, loaded["model"])
    return _weights_of(model)


def weights_only_record(description: ModelDescription, flags: dict, tensor_parallel_size: int,
                        pipeline_parallel_size: int, **extra) -> CheckpointRecord:
    """The record of a weights-only token-level checkpoint at iteration 0.

    No optimizer, scheduler or RNG state: a run loading it starts its own
    (Megatron-LM too: its args say ``no_save_optim``/``no_save_rng``).
    """
    return CheckpointRecord(
        iteration=0,
        patch_size=1,
        model_shape=ModelShape(**description.shape_fields()),
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        flags={**flags, "patch_size": 1, "tensor_model_parallel_size": tensor_parallel_size,
               "pipeline_model_parallel_size": pipeline_parallel_size},
        optimizer_format=None,
        has_rng=False,
        weights_only=True,
        **extra,
    )


def save_weights_only(save_dir: str, weights: dict, description: ModelDescription,
                      record: CheckpointRecord) -> str:
    """Write ``weights`` as ``save_dir/iter_0000000`` with ``record``; latest = 0.

    ``save_dir`` is expected to be a fresh staging directory (see output_dir).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    from patch_megatron.training import checkpointing as ckpt
    from patch_megatron.training import safe_load

    model = _model_at_tp1(description)
    _load_into(model, weights)
    path = ckpt.iteration_dir(save_dir, 0)
    os.makedirs(path)
    state = {"model": _sharded_tensors(model, is_loading=False), **to_common(record)}
    dist_checkpointing.save(state, path,
                            sharded_strategy=get_default_save_sharded_strategy("torch_dist"),
                            content_metadata=content_metadata(record))
    safe_load.write_checksums(path)
    with open(os.path.join(save_dir, ckpt.LATEST_FILE), "w") as f:
        f.write("0")
    return path


def cast(weights: dict, dtype: torch.dtype) -> dict:
    return {name: t.to(dtype) for name, t in weights.items()}
