"""Checkpoints in Megatron-LM's layout and formats, written with megatron-core's dist_checkpointing.

Layout: ``SAVE/iter_0000100/`` (torch_dist) and ``SAVE/latest_checkpointed_iteration.txt``.
``--ckpt-format torch`` writes Megatron-LM's legacy format instead: in each
iteration directory one ``mp_rank_TT[_PPP]/model_optim_rng.pt`` per tensor x
pipeline rank (the same entries as torch_dist's ``common.pt``, with the rank's
model and optimizer state dicts and RNG states), and the distributed
optimizer's ``distrib_optim.pt`` beside it. It loads only at the TP x PP that
wrote it, as in Megatron-LM. Loading reads either format, whatever
``--ckpt-format`` says (Megatron-LM detects it the same way).
A checkpoint holds the model and optimizer (sharded, so it loads at another
TP/PP), the LR schedule, the RNG states, the data position (consumed
samples), the flags and the patch size. Its entries are those Megatron-LM's
``save_checkpoint`` writes (``checkpoint_record`` has the non-tensor ones), so
Megatron-LM's ``pretrain_gpt.py --load`` resumes it and this module loads
Megatron-LM's checkpoints.

Atomicity: everything is written to ``iter_0000100.incomplete/``; only when
every rank has finished does rank 0 rename it to ``iter_0000100/`` and then
replace the ``latest`` file (write to a temporary name, fsync, rename). A
kill at any moment leaves the previous ``latest`` and its directory intact.

Safety: loading never unpickles arbitrary objects. Before dist_checkpointing
touches a checkpoint every file it would unpickle is checked (``safe_load``:
``.metadata`` through an allow-list, ``common.pt`` and the pickled byte items,
Megatron-LM's ``rng_state`` among them, with ``weights_only=True``). The
layers' ``_extra_state`` objects are written (Megatron-LM asks for them) but
never read.

Integrity: a finished save records the sha256 of its files in
``checksums.json`` before the rename; loading recomputes them and refuses a
damaged checkpoint, naming the file and the newest earlier iteration that
still verifies.
"""

from __future__ import annotations

import logging
import os
import random
import shutil

import numpy as np
import torch

from patch_megatron.model.shape import ModelShape
from patch_megatron import parallel
from patch_megatron.training import rerun, safe_load
from patch_megatron.training.checkpoint_record import (
    DISTRIBUTED_OPTIMIZER,
    LOCAL_OPTIMIZER,
    MODEL_KEYS,
    CheckpointRecord,
    RecordError,
    content_metadata,
    describe,
    plain_flags,
    read_record,
    to_common,
)

logger = logging.getLogger(__name__)
LATEST_FILE = "latest_checkpointed_iteration.txt"
INCOMPLETE_SUFFIX = ".incomplete"
# Megatron-LM's legacy ("torch") format: a file per tensor x pipeline rank.
TORCH_FORMAT_FILE = safe_load.TORCH_FORMAT_FILE
DISTRIBUTED_OPTIMIZER_FILE = safe_load.DISTRIBUTED_OPTIMIZER_FILE


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into this run; the message says why and what to do."""


def iteration_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def read_latest_iteration(load_dir: str) -> int | None:
    path = os.path.join(load_dir, LATEST_FILE)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        raw = f.read(64)
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not text (it holds the bytes {raw[:16]!r}): it should "
                              "hold an iteration number; " + _pick_iteration_hint(load_dir)) from None
    if text == "release":
        raise CheckpointError(f"{path} says 'release': release checkpoints are not supported; "
                              "point --load at a directory with iter_XXXXXXX checkpoints")
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path} holds {text!r}, not an iteration number; "
                              + _pick_iteration_hint(load_dir)) from None


def finished_iterations(load_dir: str) -> list[int]:
    """The iterations with a finished (renamed) iter_XXXXXXX directory, oldest first."""
    if not os.path.isdir(load_dir):
        return []
    found = []
    for name in os.listdir(load_dir):
        digits = name[len("iter_"):]
        if name.startswith("iter_") and digits.isdigit() and os.path.isdir(os.path.join(load_dir, name)):
            found.append(int(digits))
    return sorted(found)


def _pick_iteration_hint(load_dir: str) -> str:
    found = finished_iterations(load_dir)
    if not found:
        return f"{load_dir} holds no finished iter_XXXXXXX directory"
    listed = ", ".join(map(str, found[-8:])) + (" (the newest 8)" if len(found) > 8 else "")
    return (f"iterations saved there: {listed}. To resume from one, write its number into "
            f"{os.path.join(load_dir, LATEST_FILE)} (e.g. echo {found[-1]} > that file)")


# ---------------------------------------------------------------------------
# RNG: Megatron-LM's ``rng_state`` object, one per (pipeline, tensor) rank.

def _layout():
    from megatron.core import parallel_state as ps

    return ((ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
            (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
            ps.get_data_parallel_rank())


def _on_cuda() -> bool:
    return torch.cuda.is_available() and parallel.device().type == "cuda"


def _rng_state() -> dict:
    """This rank's RNG states, as Megatron-LM's ``get_rng_state`` collects them.

    Data-parallel ranks are seeded alike (``parallel.set_seed``, as in
    Megatron-LM) and draw alike, so the state of data-parallel rank 0 stands
    for all of them. Without CUDA the "CUDA" state is the CPU generator's, as
    Megatron-LM's own CPU runs write it.
    """
    from megatron.core import tensor_parallel

    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if _on_cuda() else torch.get_rng_state(),
        "rng_tracker_states": {name: state.cpu() for name, state in
                               tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }


def _set_rng_state(rng: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(rng["random_rng_state"])
    np.random.set_state(rng["np_rng_state"])
    torch.set_rng_state(rng["torch_rng_state"])
    cuda_state = rng["cuda_rng_state"]
    if _on_cuda() and cuda_state.numel() == torch.cuda.get_rng_state().numel():
        torch.cuda.set_rng_state(cuda_state)  # (a CPU run's state does not fit a GPU's generator)
    tensor_parallel.get_cuda_rng_tracker().set_states(rng["rng_tracker_states"])


def _rng_sharded_object():
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    (pp, tp), (pp_rank, tp_rank), dp_rank = _layout()
    return ShardedObject("rng_state", [_rng_state()], (pp, tp), (pp_rank, tp_rank),
                         replica_id=dp_rank)


# ---------------------------------------------------------------------------
# The legacy torch format's files.

def rank_directory(path: str, tp_rank: int, pp_rank: int, pp_size: int) -> str:
    """A rank's folder in a torch-format checkpoint, as Megatron-LM names it."""
    name = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return os.path.join(path, name)


def is_torch_format(path: str) -> bool:
    """Whether an iteration directory holds the legacy torch format (Megatron-LM's test)."""
    return any(n.startswith("mp_rank_0") for n in os.listdir(path))


def torch_format_layout(path: str) -> tuple[int, int] | None:
    """(TP, PP) of the rank folders in a torch-format checkpoint; None if they are irregular."""
    ranks = set()
    for name in os.listdir(path):
        parts = name.split("_")[2:]
        if name.startswith("mp_rank_") and 1 <= len(parts) <= 2 and all(p.isdigit() for p in parts):
            ranks.add((int(parts[0]), int(parts[1]) if len(parts) == 2 else None))
    tps = {tp for tp, _ in ranks}
    pps = {pp for _, pp in ranks}
    pp_size = 1 if pps == {None} else len(pps)
    if None in pps and pp_size != 1 or len(ranks) != len(tps) * pp_size:
        return None
    return len(tps), pp_size


def _save_torch_format(partial_dir, model, optimizer, record, args) -> None:
    (pp, _), (pp_rank, tp_rank), dp_rank = _layout()
    directory = rank_directory(partial_dir, tp_rank, pp_rank, pp)
    if dp_rank == 0:
        os.makedirs(directory)
    _barrier()
    if args.use_distributed_optimizer:
        # Collective over the data-parallel group; data-parallel rank 0 writes the file.
        optimizer.save_parameter_state(os.path.join(directory, DISTRIBUTED_OPTIMIZER_FILE))
    if dp_rank == 0:
        state = to_common(record, "torch")
        for key, chunk in zip(model_keys(model), model):
            state[key] = chunk.module.state_dict_for_save_checkpoint()
        state["optimizer"] = optimizer.state_dict()
        state["rng_state"] = [_rng_state()]
        torch.save(state, os.path.join(directory, TORCH_FORMAT_FILE))


def _torch_format_file(path: str) -> str:
    """This rank's file of a torch-format checkpoint; refused unless TP x PP are the saved ones."""
    (pp, tp), (pp_rank, tp_rank), _ = _layout()
    saved = torch_format_layout(path)
    if saved != (tp, pp):
        found = ("its rank folders are irregular" if saved is None
                 else f"it was saved at TP {saved[0]} x PP {saved[1]}")
        raise CheckpointError(
            f"checkpoint {path} is in Megatron-LM's legacy torch format, which loads only at the "
            f"tensor x pipeline parallel sizes that wrote it: {found}, this run is TP {tp} x PP "
            f"{pp}. Resume it at its TP x PP (a run without --ckpt-format torch then saves "
            "torch_dist, which loads at any)")
    return os.path.join(rank_directory(path, tp_rank, pp_rank, pp), TORCH_FORMAT_FILE)


# ---------------------------------------------------------------------------
# The sharded state dict: the same builder for saving and loading.

def model_keys(model: list) -> list[str]:
    """Where each model chunk's state sits in a checkpoint, as Megatron-LM names them:
    ``model``, or ``model0``, ``model1``, ... with the interleaved schedule."""
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def _model_sharded_state_dict(model: list, metadata: dict, *, is_loading: bool) -> dict:
    """The model chunks' sharded states by ``model_keys``; on loading, without the layers'
    ``_extra_state`` objects.

    Those are None for megatron's local layers (Transformer Engine keeps FP8
    scaling metadata there, which this project does not use). They are saved,
    because Megatron-LM's loader asks for them, but not read back: loading
    them would mean unpickling bytes for nothing.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    states = {}
    for key, chunk in zip(model_keys(model), model):
        state = chunk.module.sharded_state_dict(metadata=metadata)
        if is_loading:
            state = {name: value for name, value in state.items()
                     if not (isinstance(value, ShardedObject) and name.endswith("_extra_state"))}
        states[key] = state
    return states


def optimizer_format(args) -> str:
    """How the optimizer state is laid out in a checkpoint.

    "local": megatron's plain optimizer, sharded like the model, so any TP/PP/DP
    loads it. "dp_reshardable": the distributed optimizer's shards as they are
    held, no gather at save; it loads at another data-parallel size but not at
    another TP/PP. (megatron-core 0.16's gathered "fully_reshardable" format
    cannot be loaded back with torch's Adam, which is what runs without apex or
    TE, so it is not offered.)
    """
    return DISTRIBUTED_OPTIMIZER if args.use_distributed_optimizer else LOCAL_OPTIMIZER


def _check_optimizer_state_loads(record: CheckpointRecord, args, path: str) -> None:
    saved, here = record.optimizer_format, optimizer_format(args)
    fix = ("Resume with the saved flags, or pass --no-load-optim to keep the weights, schedule and "
           "data position and start the Adam moments afresh")
    flag = {LOCAL_OPTIMIZER: "without --use-distributed-optimizer",
            DISTRIBUTED_OPTIMIZER: "with --use-distributed-optimizer"}
    if saved not in flag:
        raise CheckpointError(
            f"checkpoint {path} holds distributed-optimizer state in Megatron-LM's {saved!r} "
            f"format, which this project does not read (it reads {DISTRIBUTED_OPTIMIZER!r}, what "
            f"megatron-core 0.13+ writes by default). {fix}")
    if saved != here:
        raise CheckpointError(f"checkpoint {path} holds the optimizer state of a run {flag[saved]}; "
                              f"this run is {flag[here]}. {fix}")
    here_layout = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    if saved == DISTRIBUTED_OPTIMIZER and record.layout != here_layout:
        raise CheckpointError(
            f"checkpoint {path} holds distributed-optimizer state sharded for TP "
            f"{record.layout[0]} x PP {record.layout[1]}; this run is TP {here_layout[0]} x PP "
            f"{here_layout[1]} and that state cannot be resharded (another data-parallel size "
            f"can). {fix}")
    # The stages' layer counts and the model chunks per rank shape the shards too.
    for name, what, default in (
            ("decoder_first_pipeline_num_layers", "layers on the first stage (None: the even "
             "split)", None),
            ("decoder_last_pipeline_num_layers", "layers on the last stage (None: the even "
             "split)", None),
            ("account_for_embedding_in_pipeline_split", "as the embedding counted in the split",
             False),
            ("account_for_loss_in_pipeline_split", "as the loss counted in the split", False),
            ("virtual_pipeline_model_parallel_size", "model chunks per pipeline rank", None)):
        if saved == DISTRIBUTED_OPTIMIZER and record.flags.get(name, default) != getattr(args, name):
            raise CheckpointError(
                f"checkpoint {path} holds distributed-optimizer state sharded with "
                f"{record.flags.get(name, default)} {what}; this run has "
                f"{getattr(args, name)} and that state cannot be resharded. {fix}")


def _sharding_metadata(content: dict | None, optimizer_state_format: str | None) -> dict:
    """What megatron-core's sharded_state_dict methods are told (Megatron-LM passes the same)."""
    from megatron.core import parallel_state

    metadata = dict(content or {})
    if optimizer_state_format not in (None, LOCAL_OPTIMIZER):
        metadata["distrib_optim_sharding_type"] = optimizer_state_format
    metadata["dp_cp_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return metadata


def _sharded_state_dict(model, optimizer, metadata: dict, *, with_optimizer: bool, with_rng: bool,
                        is_loading: bool):
    state = _model_sharded_state_dict(model, metadata, is_loading=is_loading)
    if with_optimizer:
        # The optimizer finds its parameters' sharded tensors in all chunks' states.
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=is_loading,
                                                          metadata=metadata)
    if with_rng:
        state["rng_state"] = _rng_sharded_object()
    return state


def _allocate_adam_state(optimizer) -> None:
    """Zero Adam state at step 0 for a distributed optimizer that has not stepped yet.

    Without apex or TE, megatron-core's DistributedOptimizer reads the step from
    torch Adam's per-parameter state to describe its state, and torch creates that
    state only at the first step: a load, or a save before any step (fp16 skips
    its first steps while the loss scale falls), would fail. Loading overwrites it.
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, distrib_optimizer.DistributedOptimizer) and not inner.optimizer.state:
            inner.init_state_fn(inner.optimizer, inner.config)
            for state in inner.optimizer.state.values():
                state["step"] = torch.zeros((), dtype=torch.float32)


def _restore_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam step counter, at the step that was loaded.

    Without apex or TE, megatron-core's DistributedOptimizer restores torch
    Adam's per-parameter ``step`` as one tensor shared by all parameters and
    then copies the per-parameter tensors it loads into it, step included; the
    checkpointed step survives only in the param groups. Bias correction needs
    each parameter's own counter at that step.
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(inner, distrib_optimizer.DistributedOptimizer):
            continue
        for group in inner.optimizer.param_groups:
            for param in group["params"]:
                state = inner.optimizer.state.get(param)
                if state and isinstance(state.get("step"), torch.Tensor):
                    state["step"] = torch.full_like(state["step"], group["step"])


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _refuse_non_finite_weights(model: list, iteration: int) -> None:
    # One reduction on the device, one host sync for all parameters.
    finite = torch.stack([torch.isfinite(p).all() for chunk in model
                          for p in chunk.module.parameters()]).all()
    bad = (~finite).to(torch.float32).reshape(1)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(bad)
    if bad.item():
        raise CheckpointError(f"iteration {iteration}: the weights hold NaN/Inf; not saving them "
                              "(the last good checkpoint stays latest)")


def record_of_run(model, scheduler, state, args, plan) -> CheckpointRecord:
    """What a checkpoint of this run at ``state`` says about itself."""
    return CheckpointRecord(
        iteration=state.iteration,
        patch_size=plan.patch_size,
        model_shape=model_shape_of(model),
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        flags=plain_flags(args),
        consumed_train_samples=state.consumed_samples,
        skipped_iters=state.skipped_iters,
        nan_iters=state.nan_iters,
        optimizer_format=optimizer_format(args),
        scheduler=scheduler.state_dict(),  # in samples, as Megatron-LM's
        flops_so_far=state.flops_so_far,
    )


def save_checkpoint(save_dir, model, optimizer, scheduler, state, args, plan) -> str:
    """Write iteration ``state.iteration`` atomically; returns its directory."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    _refuse_non_finite_weights(model, state.iteration)
    _allocate_adam_state(optimizer)
    final = iteration_dir(save_dir, state.iteration)
    partial_dir = final + INCOMPLETE_SUFFIX
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(partial_dir, ignore_errors=True)  # left over from a killed save
        os.makedirs(partial_dir)
    _barrier()
    record = record_of_run(model, scheduler, state, args, plan)
    if args.ckpt_format == "torch":
        if rerun.common_state() is not None and rank == 0:
            logger.warning("the rerun state machine's state is saved in torch_dist checkpoints "
                           "only (as in Megatron-LM): a resume from %s runs on normally",
                           partial_dir)
        _save_torch_format(partial_dir, model, optimizer, record, args)
    else:
        content = content_metadata(record)
        sharded = _sharded_state_dict(model, optimizer, _sharding_metadata(content, None),
                                      with_optimizer=True, with_rng=True, is_loading=False)
        sharded.update(to_common(record))
        rerun_common = rerun.common_state()
        if rerun_common is not None:  # the rerun machine asked for this checkpoint: its state
            sharded[rerun.COMMON_KEY] = {**rerun_common, "sharded": rerun.sharded_object(
                torch.distributed.get_world_size(), rank, rerun.rank_state())}
        strategy = get_default_save_sharded_strategy("torch_dist")
        dist_checkpointing.save(sharded, partial_dir, sharded_strategy=strategy,
                                content_metadata=content)
    _barrier()
    if rank == 0:
        previous = _previous_latest(save_dir) if args.save_retain_interval else None
        safe_load.write_checksums(partial_dir)  # every rank's files are written: record them
        if os.path.exists(final):  # an older, never-latest copy of this iteration
            shutil.rmtree(final)
        os.rename(partial_dir, final)
        tmp = os.path.join(save_dir, LATEST_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(state.iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(save_dir, LATEST_FILE))
        _fsync_dir(save_dir)
        if previous is not None:
            _drop_unretained(save_dir, previous, state.iteration, args.save_retain_interval)
    _barrier()
    return final


def _previous_latest(save_dir: str) -> int | None:
    try:
        return read_latest_iteration(save_dir)
    except CheckpointError:  # an unreadable tracker names no checkpoint to delete
        return None


def _drop_unretained(save_dir: str, previous: int, iteration: int, retain_interval: int) -> None:
    """--save-retain-interval, as Megatron-LM: once the new checkpoint is latest, the one it
    replaces is deleted unless its iteration is a multiple of the interval (or it is a link)."""
    if previous <= 0 or previous == iteration or previous % retain_interval == 0:
        return
    path = iteration_dir(save_dir, previous)
    if os.path.islink(path) or not os.path.isdir(path):
        return
    shutil.rmtree(path, ignore_errors=True)
    print(f"> deleted {path} (--save-retain-interval {retain_interval} keeps multiples of it "
          "and the latest)", flush=True)


def model_shape_of(model: list) -> ModelShape:
    """The shape of the model as megatron-core built it (T fixes no parameter); every chunk
    carries the whole model's config."""
    module = model[0].module
    config = module.config
    gated = config.gated_linear_unit
    squared = getattr(config.activation_func, "__name__", "") == "squared_relu"
    return ModelShape(**{
        "kv_channels": config.kv_channels,
        "normalization": config.normalization,
        "apply_layernorm_1p": config.layernorm_zero_centered_gamma,
        "activation": "swiglu" if gated else "squared_relu" if squared else "gelu",
        "add_bias_linear": config.add_bias_linear,
        "add_qkv_bias": config.add_qkv_bias,
        "position_embedding_type": module.position_embedding_type,
        "rotary_percent": float(module.rotary_percent),
        "rotary_interleaved": config.rotary_interleaved,
        "qk_layernorm": config.qk_layernorm,
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "ffn_hidden_size": config.ffn_hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_query_groups": config.num_query_groups or config.num_attention_heads,
        "vocab_size": module.vocab_size,
        "untie_embeddings_and_output_weights": not module.share_embeddings_and_output_weights,
        "max_position_embeddings": module.max_sequence_length,
    })


# ---------------------------------------------------------------------------
# Loading.

def inspect_checkpoint(path: str) -> tuple[dict | None, str | None]:
    """``(common.pt's dict, None)`` if the checkpoint may be loaded, else ``(None, why not)``.

    An object that must not be unpickled is reported first, whatever the
    checksums say (a planted file can come with a matching manifest); then the
    first file that differs from the manifest; then anything else unreadable.
    """
    try:
        common, unreadable = safe_load.check_checkpoint(path), None
    except safe_load.ForbiddenObjectError as error:
        return None, str(error)
    except safe_load.UnsafeCheckpointError as error:
        common, unreadable = None, str(error)
    damaged = safe_load.first_damaged_file(path)
    if damaged or unreadable:
        return None, damaged or unreadable
    return common, None


def newest_good_iteration(load_dir: str, below: int) -> int | None:
    """The newest finished iteration before ``below`` whose files verify and are safe to load."""
    for iteration in reversed(finished_iterations(load_dir)):
        if iteration < below and inspect_checkpoint(iteration_dir(load_dir, iteration))[1] is None:
            return iteration
    return None


def refusal(load_dir: str, path: str, iteration: int, why: str, how_to_pick) -> str:
    """The message refusing ``path``, with the earlier iteration that still loads, if any."""
    good = newest_good_iteration(load_dir, iteration)
    if good is None:
        fallback = "no earlier iteration there verifies either"
    else:
        fallback = f"iteration {good} ({iteration_dir(load_dir, good)}) verifies: {how_to_pick(good)}"
    return f"refusing to load checkpoint {path}: {why}. {fallback}"


def _resume_hint(load_dir: str):
    latest = os.path.join(load_dir, LATEST_FILE)
    return lambda good: f"resume from it by writing {good} into {latest}"


def _verified_common(load_dir: str, path: str, iteration: int, rank_file: str | None = None) -> dict:
    """``common.pt`` of a checkpoint whose files match their checksums and are safe to unpickle
    (of the torch format: this rank's ``rank_file``, whole, its folder's other file checked).

    Every rank checks what it will unpickle itself, and hashes its share of
    the files. If any rank finds a problem, rank 0 names the first one while
    the others wait for it (a launcher would stop rank 0 once another exits).
    """
    rank, world = ((torch.distributed.get_rank(), torch.distributed.get_world_size())
                   if torch.distributed.is_initialized() else (0, 1))
    try:
        common, why = (safe_load.check_checkpoint(path) if rank_file is None
                       else safe_load.read_rank_folder(os.path.dirname(rank_file))), None
    except safe_load.UnsafeCheckpointError as error:
        common, why = None, str(error)
    why = why or safe_load.first_damaged_file(path, part=rank, parts=world)
    if not _on_any_rank(why is not None):
        return common
    if rank == 0:
        why = inspect_checkpoint(path)[1] or why or "another rank could not read it"
        message = refusal(load_dir, path, iteration, why, _resume_hint(load_dir))
    _barrier()
    if rank != 0:
        raise CheckpointError(f"refusing to load checkpoint {path}: see rank 0's message")
    raise CheckpointError(message)


def _on_any_rank(flag: bool) -> bool:
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32, device=parallel.device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _check_compatible(record: CheckpointRecord, model, plan, args, path: str) -> None:
    here = model_shape_of(model)
    saved_shape = record.model_shape
    diffs = [f"{k}: checkpoint {getattr(saved_shape, k)} vs run {getattr(here, k)}"
             for k in MODEL_KEYS if getattr(saved_shape, k) != getattr(here, k)]
    if diffs:
        hint = ""
        if any(d.startswith("vocab_size") for d in diffs):
            hint = _vocabulary_hint(record.flags, args)
        raise CheckpointError(f"checkpoint {path} ({describe(record)}) is of another model shape: "
                              + "; ".join(diffs) + hint
                              + ". Pass the model flags the checkpoint was trained with")
    if record.patch_size != plan.patch_size and not args.finetune and not record.weights_only:
        if record.source == "megatron-lm":
            raise CheckpointError(
                f"checkpoint {path} is a Megatron-LM (token-level) checkpoint and this run is a "
                f"patch stage (--patch-size {plan.patch_size}): pass --finetune to start the "
                "patch stage from its weights (fresh optimizer, schedule and data position)")
        raise CheckpointError(
            f"checkpoint {path} was trained with patch size {record.patch_size} but this run "
            f"has --patch-size {plan.patch_size}. To start the token stage from patch-stage weights "
            "convert it with tools/convert_patch_to_token.py, or pass --finetune to load the "
            "weights only (fresh optimizer, schedule and data position)")


def _vocabulary_hint(saved: dict, args) -> str:
    """Why the padded vocabularies differ: another tokenizer, or only another padding."""
    saved_vocab, here_vocab = saved.get("vocab_size"), getattr(args, "vocab_size", None)
    saved_tok, here_tok = saved.get("tokenizer_model"), getattr(args, "tokenizer_model", None)
    saved_multiple = (saved.get("make_vocab_size_divisible_by"),
                      saved.get("tensor_model_parallel_size"))
    here_multiple = (getattr(args, "make_vocab_size_divisible_by", None),
                     getattr(args, "tensor_model_parallel_size", None))
    if saved_vocab is not None and here_vocab is not None and saved_vocab != here_vocab:
        return (f" (the vocabulary sizes differ: the checkpoint was trained with {saved_vocab} "
                f"tokens, this run has {here_vocab}; the tokenizer may differ: use the "
                "checkpoint's tokenizer and --vocab-size)")
    if saved_tok != here_tok and (saved_tok or here_tok):
        return (f" (the vocabularies differ: the checkpoint was trained with --tokenizer-model "
                f"{saved_tok}, this run uses {here_tok}; the tokenizer may differ: use the "
                "checkpoint's)")
    if None not in saved_multiple and saved_multiple != here_multiple:
        return (" (the same vocabulary padded differently: the padding is "
                "--make-vocab-size-divisible-by x TP; pick a --make-vocab-size-divisible-by that "
                "pads to the checkpoint's size)")
    return (" (the vocabulary sizes differ: the tokenizer may differ; use the checkpoint's "
            "tokenizer, and a --make-vocab-size-divisible-by x TP that pads to its size)")


def _load_scheduler(scheduler, saved: dict, path: str) -> None:
    """As in Megatron-LM: the flags' schedule must agree with the checkpoint's unless one of
    the two scheduler flags says which wins (megatron-core asserts; the message names them)."""
    try:
        scheduler.load_state_dict(saved)
    except AssertionError as error:
        raise CheckpointError(
            f"checkpoint {path}: the learning-rate schedule of the flags differs from the "
            f"checkpoint's ({error}). Pass --use-checkpoint-opt_param-scheduler to continue the "
            "checkpoint's schedule, or --override-opt_param-scheduler to apply the flags' "
            "(as in Megatron-LM)") from None


def _load_parameter_state(optimizer, directory: str) -> None:
    """The distributed optimizer's ``distrib_optim.pt`` (checked safe with the rank's folder,
    ``_verified_common``), read by data-parallel rank 0 and scattered."""
    from megatron.core.optimizer import distrib_optimizer

    source = os.path.join(directory, DISTRIBUTED_OPTIMIZER_FILE)
    # The file holds each parameter's master copy and moments; torch Adam's state (what runs
    # without apex or TE) also holds a step counter, which megatron-core's loader would look
    # up in the file. Set aside here, it is set to the loaded step after (_restore_adam_steps).
    steps = [(state, state.pop("step"))
             for inner in getattr(optimizer, "chained_optimizers", [optimizer])
             if isinstance(inner, distrib_optimizer.DistributedOptimizer)
             for state in inner.optimizer.state.values() if "step" in state]
    try:
        optimizer.load_parameter_state(source)
    finally:
        for state, step in steps:
            state["step"] = step


def _rerun_state_to_load(common: dict, record: CheckpointRecord, weights_only: bool,
                         path: str) -> dict | None:
    """The rerun machine's state a checkpoint holds for this run to take, or None.

    Only this project's entry (plain values, ``rerun.common_state``) is taken; a checkpoint
    without one resumes as any other."""
    saved = common.get(rerun.COMMON_KEY)
    if weights_only or not isinstance(saved, dict) or not isinstance(saved.get("state"), str):
        return None
    if rerun.machine().mode.value == "disabled":
        logger.warning("%s holds a step for the rerun state machine to run again; "
                       "--rerun-mode disabled goes on without it", path)
        return None
    if (saved.get("state") != "WILL_RERUN_FROM_CHECKPOINT"
            or saved.get("mode") != "validate_results"
            or not isinstance(saved.get("current_iteration"), int)):
        raise CheckpointError(f"{path}: its rerun state machine entry {saved!r} is not one this "
                              "project writes (the checkpoint is damaged); pass --rerun-mode "
                              "disabled to resume it without the rerun")
    saved_world = ((record.data_parallel_size or 1) * record.tensor_model_parallel_size
                   * record.pipeline_model_parallel_size)
    world = torch.distributed.get_world_size()
    if saved_world != world:
        raise CheckpointError(
            f"{path} was saved by the rerun state machine to rerun iteration "
            f"{record.iteration + 1} on {saved_world} processes, and this run has {world}: "
            f"resume it on {saved_world} processes, or pass --rerun-mode disabled to go on "
            "without the rerun")
    return saved


def load_checkpoint(load_dir, model, optimizer, scheduler, state, args, plan) -> str | None:
    """Load the latest checkpoint under ``load_dir`` into the run; returns what was loaded.

    Our own checkpoints of either schema and Megatron-LM's load alike: the
    record (``checkpoint_record``) says what the checkpoint holds.
    """
    from megatron.core import dist_checkpointing

    iteration = read_latest_iteration(load_dir)
    if iteration is None:
        finished = os.path.isdir(load_dir) and any(
            n.startswith("iter_") and not n.endswith(INCOMPLETE_SUFFIX) for n in os.listdir(load_dir))
        if finished:  # an iter_*.incomplete alone is a first save that was killed: start afresh
            raise CheckpointError(f"{load_dir} holds finished checkpoints but its tracker file "
                                  f"{LATEST_FILE} is missing (deleted?), so which one to resume "
                                  "is unknown; " + _pick_iteration_hint(load_dir))
        return None  # nothing to resume: start from scratch, as Megatron-LM does
    path = iteration_dir(load_dir, iteration)
    if not os.path.isdir(path):
        raise CheckpointError(f"{LATEST_FILE} names iteration {iteration} but {path} is missing; "
                              + _pick_iteration_hint(load_dir))
    rank_file = _torch_format_file(path) if is_torch_format(path) else None
    common = _verified_common(load_dir, path, iteration, rank_file)
    rerun_common = None
    try:
        record = read_record(common, path)
    except RecordError as error:
        raise CheckpointError(str(error)) from None
    _check_compatible(record, model, plan, args, path)

    # Converters' checkpoints hold weights only, by design.
    weights_only = args.finetune or record.weights_only
    with_optimizer = (not weights_only and not args.no_load_optim
                      and record.optimizer_format is not None)
    # As in Megatron-LM: RNG states are per (pipeline, tensor) rank, so only the same TP x PP.
    same_layout = record.layout == (args.tensor_model_parallel_size,
                                    args.pipeline_model_parallel_size)
    with_rng = not weights_only and not args.no_load_rng and same_layout and record.has_rng
    if with_optimizer:
        _check_optimizer_state_loads(record, args, path)
        _allocate_adam_state(optimizer)
    if rank_file is not None:
        loaded = common  # the rank's whole state, read and checked above
    else:
        metadata = _sharding_metadata(common.get("content_metadata"),
                                      record.optimizer_format if with_optimizer else None)
        sharded = _sharded_state_dict(model, optimizer, metadata, with_optimizer=with_optimizer,
                                      with_rng=with_rng, is_loading=True)
        rerun_common = _rerun_state_to_load(common, record, weights_only, path)
        if rerun_common is not None:
            sharded[rerun.COMMON_KEY] = {"sharded": rerun.sharded_object(
                torch.distributed.get_world_size(), torch.distributed.get_rank(), None)}
        # common.pt again, with weights_only=True (megatron-core's own reader takes torch's
        # default).
        loaded = dist_checkpointing.load(sharded, path,
                                         common_strategy=safe_load.safe_common_strategy(),
                                         strict=args.dist_ckpt_strictness)
        if isinstance(loaded, tuple):  # the return_* strictness modes add the key lists
            loaded = loaded[0]
    missing, unexpected = [], []
    for key, chunk in zip(model_keys(model), model):
        result = chunk.module.load_state_dict(loaded[key], strict=False)
        missing += [f"{key}.{k}" if len(model) > 1 else k for k in result.missing_keys
                    if not k.endswith("_extra_state")]  # not read, see above
        unexpected += [f"{key}.{k}" if len(model) > 1 else k for k in result.unexpected_keys]
    if missing or unexpected:
        message = (f"checkpoint {path} does not match the model: missing {missing}, "
                   f"unexpected {unexpected}")
        if args.dist_ckpt_strictness in ("assume_ok_unexpected", "raise_unexpected", "raise_all"):
            raise CheckpointError(message + " (--dist-ckpt-strictness log_all loads the rest, "
                                  "leaving the missing parameters at their initial values)")
        logger.warning("%s; continuing (--dist-ckpt-strictness %s)", message,
                       args.dist_ckpt_strictness)
    if with_optimizer:
        with torch.no_grad():  # fp32 runs: the distributed optimizer copies into the parameters
            optimizer.load_state_dict(loaded["optimizer"])
            if rank_file is not None and args.use_distributed_optimizer:
                _load_parameter_state(optimizer, os.path.dirname(rank_file))
        _restore_adam_steps(optimizer)
    else:
        # bf16/fp16: the optimizer's fp32 master weights were copied from the random
        # initialisation when it was built; without this its first step would put them back.
        optimizer.reload_model_params()
    if with_rng:
        states = loaded["rng_state"]
        # One entry, or one per data-parallel rank (Megatron-LM's --data-parallel-random-init).
        dp_rank = _layout()[2]
        _set_rng_state(states[dp_rank] if len(states) > 1 else states[0])
    if rank_file is None and rerun_common is not None:
        try:
            rerun.load(rerun_common, loaded[rerun.COMMON_KEY]["sharded"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CheckpointError(f"{path}: this rank's rerun state machine entry cannot be read "
                                  f"({type(error).__name__}: {error}; the checkpoint is damaged); "
                                  "pass --rerun-mode disabled to resume it without the rerun"
                                  ) from None
    if not weights_only:
        if record.scheduler is not None:
            _load_scheduler(scheduler, record.scheduler, path)
        state.iteration = record.iteration
        state.consumed_samples = record.consumed_train_samples
        state.skipped_iters = record.skipped_iters
        state.nan_iters = record.nan_iters
        state.flops_so_far = record.flops_so_far
    notes = [] if record.source == "patch-megatron" else [describe(record)]
    if rerun_common is not None:
        notes.append(f"the rerun state machine reruns iteration {record.iteration + 1}")
    if weights_only:
        notes.append("weights only (converted checkpoint)" if record.weights_only and not args.finetune
                     else "weights only (--finetune)")
    else:
        if not with_optimizer and not args.no_load_optim:
            notes.append("no optimizer state in it: Adam starts afresh")
        if not with_rng and not args.no_load_rng:
            notes.append("RNG state not restored: " + (
                "the parallel layout differs" if not same_layout else
                "the checkpoint holds none (reseeded from --seed)"))
    return f"loaded {path} (iteration {iteration})" + (f"; {'; '.join(notes)}" if notes else "")
