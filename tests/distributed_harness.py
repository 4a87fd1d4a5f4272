"""Run test code under megatron's parallel state: in-process (world of one) or on 2 gloo ranks."""

import os
import tempfile

import torch
import torch.multiprocessing as mp

from repo_tools import free_port


def _entry(rank, world_size, port, fn, args, result_dir):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    result = fn(*args)
    torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))


def run_on_ranks(fn, world_size, *args):
    """Run ``fn(*args)`` on ``world_size`` fresh processes; return the list of their results.

    ``fn`` must be a module-level function; it initialises its own parallel
    state from the RANK/WORLD_SIZE variables set here.
    """
    with tempfile.TemporaryDirectory() as result_dir:
        mp.start_processes(
            _entry, args=(world_size, free_port(), fn, args, result_dir),
            nprocs=world_size, join=True, start_method="spawn",
        )
        return [
            torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world_size)
        ]
