"""Patch-level GPT pretraining on megatron-core: one stage per run, torchrun-launched.

    python pretrain_patch_gpt.py ARGS                          # one process (CPU or one GPU)
    torchrun --nproc-per-node 8 pretrain_patch_gpt.py ARGS     # one node; add --nnodes etc.

ARGS are Megatron-LM's pretrain_gpt.py flags plus ``--patch-size K
--patch-data-fraction λ`` (see ``--help`` and patch_megatron/training/arguments.py
for the stage conventions). Everything is wired here, in ``main``.
"""

import os
import shutil
import sys
import time

from patch_megatron import parent_death

# dist_checkpointing's spawned helpers import this file as __mp_main__: they die with the run.
parent_death.die_with_parent_if_spawned(__name__)


def main(argv=None) -> int:
    from patch_megatron.model.spec import silence_fallback_warnings
    from patch_megatron.training.arguments import (
        ArgumentError, check_world_size, parse_args, print_arguments,
    )

    silence_fallback_warnings()  # the log names the layers and Adam in use instead
    parent_death.install()  # checkpoint writers forked from here die with this process

    # Every flag is checked before any process group starts.
    try:
        args = parse_args(argv)
        dp_size = check_world_size(args, args.check_only)
    except ArgumentError as error:
        print(f"pretrain_patch_gpt.py: error: {error}", file=sys.stderr)
        return 2
    args.data_parallel_size = dp_size
    if args.check_only is not None:
        from patch_megatron.training import command_check

        print_arguments(args)
        print(command_check.report(args, dp_size), flush=True)
        print(f"> the command line is valid for {args.check_only} processes", flush=True)
        return 0
    plan = args.stage
    if args.num_workers > 0:
        from patch_megatron.training.data import start_worker_server

        start_worker_server(args.mock_data)

    import torch

    from patch_megatron import parallel

    parallel.initialize(
        parallel.ParallelConfig(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            sequence_parallel=args.sequence_parallel,
            cpu=args.cpu,
            rank_order=(parallel.PIPELINE_BEFORE_DATA if args.use_tp_pp_dp_mapping
                        else parallel.DATA_BEFORE_PIPELINE),
            virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        ),
        seed=args.seed,
        timeout_minutes=args.distributed_timeout_minutes,
    )
    from patch_megatron import cpu_mode

    on_cpu = cpu_mode.is_installed()
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()

    def print_rank0(message):
        if rank == 0:
            print(message, flush=True)

    if rank == 0:
        print_arguments(args)

    ramped = plan.rampup_batch_size is not None  # a step is then not a fixed number of samples
    chunks = args.virtual_pipeline_model_parallel_size
    interleaved = f" ({chunks} model chunks per pipeline rank, interleaved)" if chunks else ""
    print_rank0(f"> {plan.name} stage: K={plan.patch_size}, T={plan.seq_length} positions, "
                f"{plan.tokens_per_sample} tokens/sample, global batch {plan.global_batch_size} "
                f"samples = {plan.tokens_per_step} tokens{' after the ramp' if ramped else ''}, "
                f"{plan.train_iters} iterations, warmup "
                f"{f'{plan.lr_warmup_samples} samples' if ramped else plan.lr_warmup_iters}; "
                f"world {world_size} = TP {args.tensor_model_parallel_size} x PP "
                f"{args.pipeline_model_parallel_size} x DP {dp_size}{interleaved}; "
                f"{'CPU (gloo)' if on_cpu else 'GPU (NCCL)'}")
    if ramped:
        from patch_megatron.training import batch_rampup

        print_rank0("> " + batch_rampup.describe(plan, args.micro_batch_size))

    try:
        return _train(args, plan, dp_size, rank, world_size, on_cpu, print_rank0)
    finally:
        parallel.destroy()


def _train(args, plan, dp_size, rank, world_size, on_cpu, print_rank0) -> int:
    from megatron.core import parallel_state

    from patch_megatron.model import spec
    from patch_megatron.training import build, checkpointing, data, loop, metrics, rerun, save_dir
    from patch_megatron.training.arguments import ArgumentError

    try:
        stage_data = data.build_stage_data(args, plan, dp_size)
    except ArgumentError as error:
        print(f"pretrain_patch_gpt.py: error: {error}", file=sys.stderr)
        return 2
    rerun.initialize(args)  # before the model: megatron-core's DDP validates gradients with it
    config = build.model_config(args, stage_data.vocab_size)
    model = build.build_ddp_model(args, config)
    optimizer = build.build_optimizer(args, model)
    scheduler = build.build_scheduler(args, plan, optimizer)
    build.wire_schedule_hooks(model, optimizer)
    state = loop.TrainState()
    with_te = config.transformer_impl == "transformer_engine" and not args.est  # EST: local layers
    print_rank0(f"> layers: {spec.implementation_name(with_te)}; Adam: {spec.adam_name()}")

    loaded = False
    if args.load:
        try:
            message = checkpointing.load_checkpoint(args.load, model, optimizer, scheduler, state,
                                                    args, plan)
        except checkpointing.CheckpointError as error:
            print(f"pretrain_patch_gpt.py: error: {error}", file=sys.stderr)
            return 3
        loaded = message is not None
        print_rank0(f"> {message or f'no checkpoint in {args.load}: starting from scratch'}")
    save_lock, checkpoint_bytes = None, 0
    if args.save:
        checkpoint_bytes = save_dir.checkpoint_bytes(model, args)  # a collective: on every rank
        try:  # before the first step: writable, room for a checkpoint, ours alone, not another run's
            save_lock = save_dir.prepare(args, checkpoint_bytes, loaded)
        except save_dir.SaveDirError as error:
            print(f"pretrain_patch_gpt.py: error: {error}", file=sys.stderr)
            return 2
    try:
        return _train_loop(args, plan, dp_size, rank, world_size, on_cpu, print_rank0, config,
                           model, optimizer, scheduler, stage_data, state, checkpoint_bytes)
    finally:
        if save_lock is not None:
            save_lock.release()


def _train_loop(args, plan, dp_size, rank, world_size, on_cpu, print_rank0, config, model,
                optimizer, scheduler, stage_data, state, checkpoint_bytes) -> int:
    from megatron.core import parallel_state

    from patch_megatron import parallel
    from patch_megatron.training import (batch_rampup, checkpointing, data, loop, metrics, rerun,
                                         save_dir)

    dp_rank = parallel_state.get_data_parallel_rank()

    # --num-workers reader processes per dataset; pinned batches copy to the GPU asynchronously.
    make_batches = data.BatchLoaders(args.micro_batch_size, dp_rank, dp_size, args.num_workers,
                                     pin_memory=parallel.device().type == "cuda",
                                     exit_signal_handler=args.exit_signal_handler)

    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    def save(train_state):
        started = time.monotonic()
        try:
            path = checkpointing.save_checkpoint(args.save, model, optimizer, scheduler,
                                                 train_state, args, plan)
        except checkpointing.CheckpointError:  # our own refusal (NaN/Inf weights), as it is
            raise
        except (Exception, CheckpointException) as error:
            # Judged before the half-written copy is removed: it is what filled the disk.
            full = save_dir.no_space_message(error, args.save, checkpoint_bytes,
                                             checkpointing.read_latest_iteration(args.save))
            if full is None:
                raise
            if rank == 0:  # give its space back; it never became latest
                shutil.rmtree(checkpointing.iteration_dir(args.save, train_state.iteration)
                              + checkpointing.INCOMPLETE_SUFFIX, ignore_errors=True)
            raise checkpointing.CheckpointError(full) from None
        print_rank0(f"> saved {path} in {time.monotonic() - started:.1f} s")

    from patch_megatron.training.arguments import num_microbatches

    # megatron-core's micro-batch calculator gives each step's batch (--rampup-batch-size).
    with batch_rampup.StepBatches(plan, args.micro_batch_size, dp_size, rank) as step_batches:
        run = loop.Run(
            args=args, plan=plan, model=model, optimizer=optimizer, scheduler=scheduler,
            data=stage_data, make_batches=make_batches,
            num_microbatches=num_microbatches(args, dp_size), step_batches=step_batches,
            shape=config.shape, peak_tflops=metrics.mfu_peak_tflops(args, on_cpu),
            world_size=world_size, print=print_rank0,
            tensorboard=metrics.TensorBoard(args, enabled=rank == 0), save=save,
        )
        try:
            reason = loop.train(run, state)
        except loop.NonFiniteLossError as error:
            print(f"pretrain_patch_gpt.py: error: {error}", file=sys.stderr)
            return 4
        except rerun.RerunExit as error:  # Megatron-LM's exit codes 16 and 17
            print(f"pretrain_patch_gpt.py: {error}", file=sys.stderr)
            return error.code
        except checkpointing.CheckpointError as error:  # e.g. refusing to save NaN/Inf weights
            print(f"pretrain_patch_gpt.py: error: {error}", file=sys.stderr)
            return 3
        finally:
            run.tensorboard.close()
            make_batches.close()  # the reader processes end with the run, not at interpreter exit
    print_rank0(f"> {reason}")
    return 0




if __name__ == "__main__":  # dist_checkpointing may start worker processes that import this file
    sys.exit(main())
