"""Process groups and seeds: torchrun's environment to megatron-core's parallel state."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from patch_megatron import cpu_mode


# How megatron-core numbers the ranks, fastest-varying group first: Megatron-LM's default puts
# data-parallel replicas before pipeline stages; --use-tp-pp-dp-mapping swaps the two.
DATA_BEFORE_PIPELINE = "tp-cp-ep-dp-pp"
PIPELINE_BEFORE_DATA = "tp-cp-ep-pp-dp"


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    cpu: bool | None = None  # None: CPU mode exactly when no GPU exists
    rank_order: str = DATA_BEFORE_PIPELINE
    virtual_pipeline_model_parallel_size: int | None = None  # chunks per rank, interleaved


def device() -> torch.device:
    """The device this rank computes on."""
    if cpu_mode.is_installed() or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def initialize(config: ParallelConfig, seed: int, timeout_minutes: float = 10) -> None:
    """Start torch.distributed from torchrun's variables and build megatron's groups.

    Works for a single process without torchrun too (world size 1). CPU mode
    uses gloo; the GPU path uses NCCL and one device per local rank.
    ``timeout_minutes`` (--distributed-timeout-minutes) bounds a collective's
    wait in every group: the world's and each of megatron's (TP, PP, DP, ...).
    """
    from datetime import timedelta

    from megatron.core import parallel_state, tensor_parallel

    on_cpu = cpu_mode.maybe_install(config.cpu)
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    model_parallel = config.tensor_model_parallel_size * config.pipeline_model_parallel_size
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor x pipeline parallel size "
            f"{model_parallel}; launch a multiple of {model_parallel} processes"
        )
    if not on_cpu:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            # One process without torchrun: any free port, so runs side by side do not collide.
            os.environ["MASTER_PORT"] = str(free_port()) if world_size == 1 else "29500"
        torch.distributed.init_process_group(
            backend="gloo" if on_cpu else "nccl",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=config.tensor_model_parallel_size,
            pipeline_model_parallel_size=config.pipeline_model_parallel_size,
            order=config.rank_order,
            virtual_pipeline_model_parallel_size=config.virtual_pipeline_model_parallel_size,
            # Without it megatron gives its groups its own default (30 minutes).
            distributed_timeout_minutes=timeout_minutes,
        )
    set_seed(seed)


def initialize_world_of_one(seed: int = 0) -> None:
    """This process alone as megatron's world (CPU mode, gloo): the converters, and tests that
    build models in-process. An existing world is kept and reseeded."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        set_seed(seed)
        return
    # Always a fresh port: one left in the environment may be a finished world's, still bound.
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    initialize(ParallelConfig(cpu=True), seed=seed)


def set_seed(seed: int) -> None:
    """Megatron's seeding: the data-parallel seed differs by pipeline stage, TP ranks fork."""
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
