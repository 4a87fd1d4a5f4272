"""patch_megatron.parallel: --distributed-timeout-minutes reaches every process group, and the
rank order (--use-tp-pp-dp-mapping) is megatron-core's."""

import multiprocessing
import os
import queue as queue_module
import signal
import time

import pytest

from tests.distributed_harness import free_port, run_on_ranks

TIMEOUT_MINUTES = 0.05  # 3 s: megatron's own default for its groups is 30 minutes


def _rank(rank, port, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    from megatron.core import parallel_state

    from patch_megatron import parallel

    torch.set_num_threads(1)
    parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=2, cpu=True), seed=1,
                        timeout_minutes=TIMEOUT_MINUTES)
    torch.distributed.barrier()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # a hung peer: alive, never answering
        return
    time.sleep(0.5)
    started = time.monotonic()
    try:
        torch.distributed.all_reduce(torch.ones(1), group=parallel_state.get_tensor_model_parallel_group())
        outcome = "completed"
    except Exception as error:  # gloo raises on timeout
        outcome = type(error).__name__
    queue.put(("waited", time.monotonic() - started, outcome))


def test_a_frozen_tensor_parallel_peer_times_out_after_the_given_timeout():
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    ranks = [context.Process(target=_rank, args=(r, port, queue), daemon=True) for r in range(2)]
    for process in ranks:
        process.start()
    try:
        reports = {}
        deadline = time.monotonic() + 60
        while "waited" not in reports and time.monotonic() < deadline:
            try:
                report = queue.get(timeout=1)
            except queue_module.Empty:
                if ranks[0].exitcode:  # rank 0 crashed before reporting
                    break
                continue
            reports[report[0]] = report[1:]
        assert "waited" in reports, f"rank 0 did not return within 60 s: {reports}"
        waited, outcome = reports["waited"]
        assert outcome != "completed"
        # It gave up after about the timeout, not megatron's 30 minutes.
        assert TIMEOUT_MINUTES * 60 * 0.9 <= waited < 60, waited
    finally:
        for process in ranks:
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
            process.join(timeout=10)


def _stages_and_replicas():
    import torch
    from megatron.core import parallel_state

    from patch_megatron import parallel

    layouts = {}
    for order in (parallel.DATA_BEFORE_PIPELINE, parallel.PIPELINE_BEFORE_DATA):
        parallel.initialize(parallel.ParallelConfig(pipeline_model_parallel_size=2, cpu=True,
                                                    rank_order=order), seed=1)
        layouts[order] = (parallel_state.get_pipeline_model_parallel_rank(),
                          parallel_state.get_data_parallel_rank())
        parallel_state.destroy_model_parallel()  # the world stays for the next order
    rank = torch.distributed.get_rank()
    parallel.destroy()
    return rank, layouts


def test_the_rank_order_numbers_replicas_or_stages_first():
    # 4 ranks = PP 2 x DP 2, as (stage, replica). Megatron-LM's default: consecutive ranks are
    # data-parallel replicas of one stage; --use-tp-pp-dp-mapping: they are one pipeline's stages.
    from patch_megatron import parallel

    ranks = dict(run_on_ranks(_stages_and_replicas, 4))
    by_order = {order: {rank: layouts[order] for rank, layouts in ranks.items()}
                for order in (parallel.DATA_BEFORE_PIPELINE, parallel.PIPELINE_BEFORE_DATA)}
    assert by_order[parallel.DATA_BEFORE_PIPELINE] == {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1)}
    assert by_order[parallel.PIPELINE_BEFORE_DATA] == {0: (0, 0), 1: (1, 0), 2: (0, 1), 3: (1, 1)}

if __name__ == "__main__":
    pytest.main([__file__])
