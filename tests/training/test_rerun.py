"""The rerun state machine (patch_megatron/training/rerun.py) in real runs of pretrain_patch_gpt.py.

Megatron-LM's functional tests gpt3_mcore_reruns_{transient,persistent_1,persistent_2}
inject errors the same way (--error-injection-rate/-type) and look for the same log lines.
With rate 1 every validation is rejected; the machine leaves a run's first step alone.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from patch_megatron.training.safe_load import read_common
from repo_tools import IN_PROCESS_READING, REPO_ROOT, child_environment, free_port

SCRIPT = os.path.join(REPO_ROOT, "pretrain_patch_gpt.py")
# Dropout on: a rerun that did not restore the RNG states would draw other masks.
FLAGS = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
         "--max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 4 --mock-data "
         "--vocab-size 100 --cpu --lr 3e-4 --train-iters 5 --eval-iters 0 --patch-size 4 "
         "--patch-data-fraction 1 --log-interval 1 --hidden-dropout 0.1 "
         "--attention-dropout 0.1").split() + list(IN_PROCESS_READING)


def run(*extra, nproc=1):
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                     f"--master-port={free_port()}"]
    return subprocess.run(launcher + [SCRIPT, *FLAGS, *extra], capture_output=True, text=True,
                          env=child_environment(), timeout=300, cwd=REPO_ROOT)


def steps(stdout):
    """(loss, grad norm) of each logged iteration."""
    return re.findall(r"patch loss: (\S+) \| grad norm: (\S+)", stdout)


def latest(save):
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        return int(f.read())


def rerun_entry(save, iteration):
    return read_common(os.path.join(save, f"iter_{iteration:07d}")).get("rerun_state_machine")


@pytest.mark.parametrize("layout", [[], ["--pipeline-model-parallel-size", "2",
                                         "--use-distributed-optimizer", "--overlap-grad-reduce"]],
                         ids=["one process", "PP=2+distributed optimizer"])
def test_a_rerun_repeats_the_step_exactly(layout):
    # Not fatal (--nan-action skip makes the NaN/Inf validations so): each step from the second
    # on is rejected, rerun on the same micro-batches with the same RNG states, and goes on.
    # Across pipeline stages, the first one rereads the tokens and the last one the labels.
    nproc = 2 if layout else 1
    plain = run("--rerun-mode", "disabled", *layout, nproc=nproc)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "Result validation enabled" not in plain.stderr
    rerun = run("--nan-action", "skip", "--error-injection-rate", "1", *layout, nproc=nproc)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    # (Injected where a loss is validated: on the last stage.)
    assert rerun.stderr.count("Injecting error type Transient error") == 4
    assert rerun.stderr.count("Continuing normal execution because failed validation was not "
                              "fatal") == 4
    assert len(steps(plain.stdout)) == 5
    assert steps(rerun.stdout) == steps(plain.stdout)


def test_a_transient_fault_saves_and_exits_17(tmp_path):
    save = str(tmp_path / "ckpt")
    tracker = tmp_path / "rejected.txt"
    result = run("--error-injection-rate", "1", "--error-injection-type", "transient_error",
                 "--save", save, "--result-rejected-tracker-filename", str(tracker))
    assert result.returncode == 17, result.stderr[-2000:]
    statuses = re.findall(r"rank=0 iteration=2 status=(\S+) .* message='found NaN in local "
                          r"forward loss calculation'", tracker.read_text())
    assert statuses == ["RerunValidationStatus.INITIAL_RUN",
                        "RerunValidationStatus.FIRST_RERUN_NOT_REPRODUCIBLE"]
    assert "Result validation enabled" in result.stderr
    assert re.search(r"Rank 0, node \S+, device \S+, iteration #2: Possible transient error!!",
                     result.stderr)
    assert len(steps(result.stdout)) == 1  # the second step is not taken
    assert latest(save) == 1
    assert rerun_entry(save, 1) is None  # nothing to rerun: it resumes as any checkpoint
    assert "Traceback" not in result.stderr


def test_a_reproducible_fault_is_saved_for_a_rerun_on_another_gpu(tmp_path):
    save = str(tmp_path / "ckpt")
    first = run("--error-injection-rate", "1", "--error-injection-type", "persistent_error",
                "--save", save)
    assert first.returncode == 16, first.stderr[-2000:]
    assert "Injecting error type Persistent error" in first.stderr
    assert "First rerun: unexpected result is reproducible within the tolerance" in first.stderr
    assert ("Saving a checkpoint and exiting now. Please resume the job from the checkpoint to "
            "rerun the last iteration and establish a diagnostic") in first.stderr
    assert latest(save) == 1
    assert rerun_entry(save, 1) == {"mode": "validate_results",
                                    "state": "WILL_RERUN_FROM_CHECKPOINT", "current_iteration": 2}

    # Resumed on this machine again, the same "GPU": Megatron-LM's machine asks for another.
    again = run("--error-injection-rate", "1", "--error-injection-type", "persistent_error",
                "--save", save, "--load", save)
    assert again.returncode == 16, again.stderr[-2000:]
    assert "the rerun state machine reruns iteration 2" in again.stdout
    assert "Got rescheduled on the same GPU" in again.stderr
    assert steps(again.stdout) == [] and latest(save) == 1  # nothing trained, nothing saved

    # On another number of processes the per-rank state has no owner: refused, with the fix.
    elsewhere = run("--error-injection-rate", "1", "--error-injection-type", "persistent_error",
                    "--load", save, nproc=2)
    assert elsewhere.returncode != 0 and "[rank0]: Traceback" not in elsewhere.stderr
    assert re.search(r"saved by the rerun state machine to rerun iteration 2 on 1 processes, "
                     r"and this run has 2: resume it on 1 processes, or pass --rerun-mode "
                     r"disabled", elsewhere.stderr)
    # A damaged entry is named, not a traceback (the manifest removed, so that the record is read).
    damaged = str(tmp_path / "damaged")
    shutil.copytree(save, damaged)
    os.remove(os.path.join(damaged, "iter_0000001", "checksums.json"))
    common_file = os.path.join(damaged, "iter_0000001", "common.pt")
    common = read_common(os.path.dirname(common_file))
    common["rerun_state_machine"]["state"] = "RERUNNING_AGAIN"
    torch.save(common, common_file)
    refused = run("--load", damaged)
    assert refused.returncode == 3 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "its rerun state machine entry" in refused.stderr and "is not one this project " \
        "writes (the checkpoint is damaged); pass --rerun-mode disabled" in refused.stderr
    # With the machine disabled, the checkpoint resumes as any other, damaged entry or not.
    for load in (save, damaged):
        plain = run("--rerun-mode", "disabled", "--load", load)
        assert plain.returncode == 0, plain.stderr[-2000:]
        assert len(steps(plain.stdout)) == 4


def test_a_spiky_loss_is_rerun_and_the_run_goes_on(model_parallel_world_of_one):
    # --check-for-spiky-loss, in this process: the machine learns the largest loss over its
    # first 100 validations, then rejects one 10x as large (not fatally): the step runs twice.
    import torch

    from patch_megatron.training import rerun
    from patch_megatron.training.arguments import parse_args

    args = parse_args(FLAGS + ["--check-for-spiky-loss"])
    rerun.initialize(args)
    try:
        machine = rerun.machine()
        batches = rerun.replayable(iter(range(1000)))
        checks = rerun.LossChecks.of(args)
        runs, read = [], []
        for step in range(103):
            loss = torch.tensor(31.0 if step == 102 else 1.0 + step % 3)  # largest before: 3
            n = 0
            while machine.should_run_forward_backward(batches):
                read.append(next(batches))
                rerun.validate_loss(loss, checks)
                n += 1
            assert machine.should_checkpoint_and_exit() == (False, False, 0)
            runs.append(n)
        assert runs == [1] * 102 + [2]
        assert read == list(range(102)) + [102, 102]  # the rerun replays the step's micro-batch
    finally:  # the machine is one per process: the next test gets the default one
        rerun.initialize(parse_args(FLAGS + ["--rerun-mode", "disabled"]))


def test_a_rerun_on_another_gpu_tells_a_persistent_fault(model_parallel_world_of_one, caplog):
    # Megatron-LM's gpt3_mcore_reruns_persistent_{1,2}, in this process: the saved state goes
    # through torch.save/load(weights_only=True) and is resumed as if on another node.
    import io

    import torch

    from patch_megatron.training import rerun
    from patch_megatron.training.arguments import parse_args

    args = parse_args(FLAGS + ["--error-injection-rate", "1",
                               "--error-injection-type", "persistent_error"])
    loss = torch.tensor(2.5)

    def step(machine, batches):
        while machine.should_run_forward_backward(batches):
            next(batches)
            rerun.validate_loss(loss, rerun.LossChecks.of(args))
        return machine.should_checkpoint_and_exit()

    rerun.initialize(args)
    try:
        machine, batches = rerun.machine(), rerun.replayable(iter(range(100)))
        assert step(machine, batches) == (False, False, 0)  # the first step is not validated
        assert step(machine, batches) == (True, True, 16)  # reproduced: resume elsewhere
        saved = io.BytesIO()
        torch.save({"common": rerun.common_state(), "rank": rerun.rank_state()}, saved)
        saved.seek(0)
        state = torch.load(saved, weights_only=True)
        assert state["rank"]["failed_validation_call"] == [
            "found NaN in local forward loss calculation", 0, 1]

        rerun.initialize(args)  # the resumed job, on another node
        state["rank"]["suspicious_node"] = "another-node"
        assert rerun.load(state["common"], state["rank"])
        with caplog.at_level("WARNING", logger="megatron.core.rerun_state_machine"):
            assert step(rerun.machine(), rerun.replayable(iter(range(100)))) == (False, True, 17)
        assert "Possible persistent error!" in caplog.text
        assert "rescheduled on the same GPU" not in caplog.text
    finally:
        rerun.initialize(parse_args(FLAGS + ["--rerun-mode", "disabled"]))
