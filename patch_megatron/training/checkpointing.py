"""Checkpoints in Megatron-LM's layout, written with megatron-core's dist_checkpointing.

Layout: ``SAVE/iter_0000100/`` (torch_dist) and ``SAVE/latest_checkpointed_iteration.txt``.
A checkpoint holds the model and optimizer (sharded, so it loads at another
TP/PP), the LR schedule, every rank's RNG state, the data position (consumed
samples), the flags and the patch size.

Atomicity: everything is written to ``iter_0000100.incomplete/``; only when
every rank has finished does rank 0 rename it to ``iter_0000100/`` and then
replace the ``latest`` file (write to a temporary name, fsync, rename). A
kill at any moment leaves the previous ``latest`` and its directory intact.

Safety: loading never unpickles arbitrary objects. Everything sharded is a
tensor (RNG states included; the layers' empty ``_extra_state`` objects are
left out), and before dist_checkpointing touches a checkpoint every file it
would unpickle is checked (``safe_load``: ``.metadata`` through an allow-list,
``common.pt`` and pickled byte items with ``weights_only=True``).

Integrity: a finished save records the sha256 of its files in
``checksums.json`` before the rename; loading recomputes them and refuses a
damaged checkpoint, naming the file and the newest earlier iteration that
still verifies.
"""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch

from patch_megatron import parallel
from patch_megatron.training import safe_load
from patch_megatron.training.arguments import args_to_dict

LATEST_FILE = "latest_checkpointed_iteration.txt"
INCOMPLETE_SUFFIX = ".incomplete"
CHECKPOINT_VERSION = 3.0
# What must match between a checkpoint and the model loading it.
SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "num_query_groups", "vocab_size", "untie_embeddings_and_output_weights")


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
# RNG: one shard per rank, restored only into the same layout.

def _layout():
    from megatron.core import parallel_state as ps

    return ((ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size()),
            (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
             ps.get_data_parallel_rank()))


def _rng_tensors() -> dict[str, torch.Tensor]:
    """Every RNG state of this rank as plain tensors (nothing that needs unpickling)."""
    from megatron.core import tensor_parallel

    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_misc": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=torch.float64),
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_misc": torch.tensor([py_version, py_gauss is not None, py_gauss or 0.0],
                                    dtype=torch.float64),
    }
    for name, tracker_state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        tensors[f"tracker.{name}"] = tracker_state.cpu()
    if torch.cuda.is_available() and parallel.device().type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state()
    return tensors


def _set_rng_tensors(tensors: dict[str, torch.Tensor]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(tensors["torch"])
    pos, has_gauss, gauss = tensors["numpy_misc"].tolist()
    np.random.set_state(("MT19937", tensors["numpy_keys"].numpy().astype(np.uint32), int(pos),
                         int(has_gauss), gauss))
    version, has_py_gauss, py_gauss = tensors["python_misc"].tolist()
    random.setstate((int(version), tuple(tensors["python_state"].tolist()),
                     py_gauss if has_py_gauss else None))
    tracker = {name[len("tracker."):]: t for name, t in tensors.items() if name.startswith("tracker.")}
    tensor_parallel.get_cuda_rng_tracker().set_states(tracker)
    if "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"])


def _rng_sharded_tensors() -> dict:
    """One shard per (pipeline, tensor, data) rank, stored as tensors of a [pp, tp, dp, n] grid."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    (pp, tp, dp), (pp_rank, tp_rank, dp_rank) = _layout()
    return {
        name: ShardedTensor.from_rank_offsets(
            f"rng_state.{name}", t.contiguous()[None, None, None],
            (0, pp_rank, pp), (1, tp_rank, tp), (2, dp_rank, dp), replica_id=0,
        )
        for name, t in _rng_tensors().items()
    }


# ---------------------------------------------------------------------------
# The sharded state dict: the same builder for saving and loading.

def _model_sharded_state_dict(model) -> dict:
    """The model's sharded tensors, without the layers' ``_extra_state`` objects.

    Those are None for megatron's local layers (Transformer Engine keeps FP8
    scaling metadata there, which this project does not use), and
    dist_checkpointing would store them as pickled bytes that loading must
    unpickle: leaving them out keeps every checkpoint loadable without it.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {key: value for key, value in model.module.sharded_state_dict().items()
            if not (isinstance(value, ShardedObject) and key.endswith("_extra_state"))}


def optimizer_format(args) -> str:
    """How the optimizer state is laid out in a checkpoint.

    "local": megatron's plain optimizer, sharded like the model, so any TP/PP/DP
    loads it. "dp_reshardable": the distributed optimizer's shards as they are
    held, no gather at save; it loads at another data-parallel size but not at
    another TP/PP. (megatron-core 0.16's gathered "fully_reshardable" format
    cannot be loaded back with torch's Adam, which is what runs without apex or
    TE, so it is not offered.)
    """
    return "dp_reshardable" if args.use_distributed_optimizer else "local"


def _check_optimizer_state_loads(common: dict, args, path: str) -> None:
    saved = common.get("optimizer_format", "local")
    here = optimizer_format(args)
    fix = ("Resume with the saved flags, or pass --no-load-optim to keep the weights, schedule and "
           "data position and start the Adam moments afresh")
    if saved != here:
        flag = {"local": "without --use-distributed-optimizer",
                "dp_reshardable": "with --use-distributed-optimizer"}
        raise CheckpointError(f"checkpoint {path} holds the optimizer state of a run {flag[saved]}; "
                              f"this run is {flag[here]}. {fix}")
    saved_layout = common.get("layout")
    here_layout = _tp_pp(args)
    if saved == "dp_reshardable" and saved_layout != here_layout:
        raise CheckpointError(
            f"checkpoint {path} holds distributed-optimizer state sharded for TP "
            f"{saved_layout['tensor_model_parallel_size']} x PP "
            f"{saved_layout['pipeline_model_parallel_size']}; this run is TP "
            f"{here_layout['tensor_model_parallel_size']} x PP "
            f"{here_layout['pipeline_model_parallel_size']} and that state cannot be resharded "
            f"(another data-parallel size can). {fix}")


def _tp_pp(args) -> dict:
    return {"tensor_model_parallel_size": args.tensor_model_parallel_size,
            "pipeline_model_parallel_size": args.pipeline_model_parallel_size}


def _sharded_state_dict(model, optimizer, *, with_optimizer: bool, with_rng: bool, is_loading: bool,
                        optimizer_state_format: str = "local"):
    model_sd = _model_sharded_state_dict(model)
    state = {"model": model_sd}
    if with_optimizer:
        metadata = None
        if optimizer_state_format != "local":
            metadata = {"distrib_optim_sharding_type": optimizer_state_format}
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                          metadata=metadata)
    if with_rng:
        state["rng_state"] = _rng_sharded_tensors()
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


def _refuse_non_finite_weights(model, iteration: int) -> None:
    # One reduction on the device, one host sync for all parameters.
    finite = torch.stack([torch.isfinite(p).all() for p in model.module.parameters()]).all()
    bad = (~finite).to(torch.float32).reshape(1)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(bad)
    if bad.item():
        raise CheckpointError(f"iteration {iteration}: the weights hold NaN/Inf; not saving them "
                              "(the last good checkpoint stays latest)")


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
    sharded = _sharded_state_dict(model, optimizer, with_optimizer=True, with_rng=True,
                                  is_loading=False, optimizer_state_format=optimizer_format(args))
    sharded.update({
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": state.iteration,
        "consumed_train_samples": state.consumed_samples,
        "skipped_iters": state.skipped_iters,
        "nan_iters": state.nan_iters,
        "opt_param_scheduler": scheduler.state_dict(),
        "patch_size": plan.patch_size,
        "stage": plan.name,
        "model_shape": model_shape_of(model),
        "layout": _tp_pp(args),
        "optimizer_format": optimizer_format(args),
        "args": args_to_dict(args),
    })
    strategy = get_default_save_sharded_strategy("torch_dist")
    dist_checkpointing.save(sharded, partial_dir, sharded_strategy=strategy)
    _barrier()
    if rank == 0:
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
    _barrier()
    return final


def model_shape_of(model) -> dict:
    """The numbers that fix the parameters' shapes (RoPE and T have none)."""
    module = model.module
    config = module.config
    return {
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "ffn_hidden_size": config.ffn_hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_query_groups": config.num_query_groups or config.num_attention_heads,
        "vocab_size": module.vocab_size,
        "untie_embeddings_and_output_weights": not module.share_embeddings_and_output_weights,
    }


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


def _verified_common(load_dir: str, path: str, iteration: int) -> dict:
    """``common.pt`` of a checkpoint whose files match their checksums and are safe to unpickle.

    Every rank checks what it will unpickle itself, and hashes its share of
    the files. If any rank finds a problem, rank 0 names the first one while
    the others wait for it (a launcher would stop rank 0 once another exits).
    """
    rank, world = ((torch.distributed.get_rank(), torch.distributed.get_world_size())
                   if torch.distributed.is_initialized() else (0, 1))
    try:
        common, why = safe_load.check_checkpoint(path), None
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


def _check_compatible(common: dict, model, plan, args, path: str) -> None:
    saved_shape = common.get("model_shape")
    if saved_shape is None:
        raise CheckpointError(f"{path} has no model shape record: not written by pretrain_patch_gpt.py")
    here = model_shape_of(model)
    diffs = [f"{k}: checkpoint {saved_shape.get(k)} vs run {here[k]}" for k in SHAPE_KEYS
             if saved_shape.get(k) != here[k]]
    if diffs:
        hint = ""
        if any(d.startswith("vocab_size") for d in diffs):
            hint = _vocabulary_hint(common.get("args") or {}, args)
        raise CheckpointError(f"checkpoint {path} is of another model shape: " + "; ".join(diffs)
                              + hint + ". Pass the model flags the checkpoint was trained with")
    if common.get("patch_size") != plan.patch_size and not args.finetune:
        raise CheckpointError(
            f"checkpoint {path} was trained with patch size {common.get('patch_size')} but this run "
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


def load_checkpoint(load_dir, model, optimizer, scheduler, state, args, plan) -> str | None:
    """Load the latest checkpoint under ``load_dir`` into the run; returns what was loaded."""
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
    common = _verified_common(load_dir, path, iteration)
    _check_compatible(common, model, plan, args, path)

    same_layout = common.get("layout") == _tp_pp(args)
    # The data-parallel size also shapes the RNG shards.
    saved_dp = common.get("args", {}).get("data_parallel_size")
    # A handoff checkpoint (tools/convert_patch_to_token.py) holds weights only, by design.
    converted = bool(common.get("weights_only"))
    weights_only = args.finetune or converted
    with_optimizer = not weights_only and not args.no_load_optim
    with_rng = not weights_only and not args.no_load_rng and same_layout and \
        saved_dp == args.data_parallel_size
    if with_optimizer:
        _check_optimizer_state_loads(common, args, path)
        _allocate_adam_state(optimizer)
    sharded = _sharded_state_dict(model, optimizer, with_optimizer=with_optimizer,
                                  with_rng=with_rng, is_loading=True,
                                  optimizer_state_format=common.get("optimizer_format", "local"))
    # common.pt again, with weights_only=True (megatron-core's own reader takes torch's default).
    loaded = dist_checkpointing.load(sharded, path, common_strategy=safe_load.safe_common_strategy())
    missing, unexpected = model.module.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]  # not saved, see above
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {missing}, "
                              f"unexpected {unexpected}")
    if with_optimizer:
        with torch.no_grad():  # fp32 runs: the distributed optimizer copies into the parameters
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
    else:
        # bf16/fp16: the optimizer's fp32 master weights were copied from the random
        # initialisation when it was built; without this its first step would put them back.
        optimizer.reload_model_params()
    if with_rng:
        _set_rng_tensors({name: t[0, 0, 0] for name, t in loaded["rng_state"].items()})
    if not weights_only:
        scheduler.load_state_dict(common["opt_param_scheduler"])
        state.iteration = common["iteration"]
        state.consumed_samples = common["consumed_train_samples"]
        state.skipped_iters = common.get("skipped_iters", 0)
        state.nan_iters = common.get("nan_iters", 0)
    notes = []
    if weights_only:
        notes.append("weights only (converted checkpoint)" if converted else "weights only (--finetune)")
    elif not with_rng and not args.no_load_rng:
        notes.append("RNG state not restored: the parallel layout differs")
    return f"loaded {path} (iteration {iteration})" + (f"; {'; '.join(notes)}" if notes else "")
