"""patch_megatron.parallel: --distributed-timeout-minutes reaches every process group, and the
rank order (--use-tp-pp-dp-mapping) is megatron-core's."""

import multiprocessing
import os
import queue as queue_module
import signal
import time

import pytest

from tests.distributed_harness import free_port

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


def test_the_rank_order_reaches_megatron_core(monkeypatch):
    # What the two orders mean to megatron-core, for 4 ranks = PP 2 x DP 2: by default
    # consecutive ranks are data-parallel replicas of one stage; with --use-tp-pp-dp-mapping
    # they are one pipeline's stages.
    from megatron.core import parallel_state
    from megatron.core.parallel_state import RankGenerator

    from patch_megatron import parallel

    def groups(order, kind):
        return RankGenerator(tp=1, ep=1, dp=2, pp=2, cp=1, order=order).get_ranks(kind)

    assert groups(parallel.DATA_BEFORE_PIPELINE, "dp") == [[0, 1], [2, 3]]
    assert groups(parallel.PIPELINE_BEFORE_DATA, "pp") == [[0, 1], [2, 3]]
    # And what parallel.initialize hands megatron-core's group builder (in this process's
    # world of one, the builder replaced by a recorder).
    parallel.initialize_world_of_one()
    given = {}
    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: False)
    monkeypatch.setattr(parallel_state, "initialize_model_parallel", lambda **kw: given.update(kw))
    monkeypatch.setattr(parallel, "set_seed", lambda seed: None)
    parallel.initialize(parallel.ParallelConfig(cpu=True, rank_order=parallel.PIPELINE_BEFORE_DATA,
                                                virtual_pipeline_model_parallel_size=3), seed=1)
    assert given["order"] == parallel.PIPELINE_BEFORE_DATA
    assert given["virtual_pipeline_model_parallel_size"] == 3

if __name__ == "__main__":
    pytest.main([__file__])
