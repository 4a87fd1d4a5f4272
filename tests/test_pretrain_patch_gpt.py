"""pretrain_patch_gpt.py end to end on CPU: real processes, real kills, tiny models.

One patch-stage run (K=4) is the reference; the other runs are compared with
it iteration by iteration: other parallel layouts loading its checkpoint,
a run SIGKILLed and resumed, a SIGTERM exit. Each launch imports megatron
(~5 s), so the checks are grouped into few launches.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from patch_megatron.training import log_reading
from repo_tools import IN_PROCESS_READING, free_port
from patch_megatron.llama_recipe import RECIPE_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "pretrain_patch_gpt.py")
FLAGS = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 8 "
    "--micro-batch-size 2 --global-batch-size 4 --train-iters 8 --mock-data --vocab-size 128 "
    "--make-vocab-size-divisible-by 64 --untie-embeddings-and-output-weights "
    "--patch-size 4 --patch-data-fraction 0.667 --lr 3e-3 --lr-warmup-iters 1 "
    "--log-interval 1 --eval-interval 4 --eval-iters 1 --cpu"
).split() + list(RECIPE_FLAGS) + list(IN_PROCESS_READING)


def command(extra, nproc=1):
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                     f"--master-port={free_port()}"]
    return launcher + [SCRIPT] + FLAGS + list(extra)


def environment():
    return dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()),
                PYTHONWARNINGS="ignore")


def run(extra, nproc=1, timeout=240):
    result = subprocess.run(command(extra, nproc), capture_output=True, text=True,
                            env=environment(), timeout=timeout, cwd=REPO)
    return result


def losses(stdout):
    return log_reading.losses(stdout)


def latest(save_dir):
    with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt")) as f:
        return int(f.read())


# What is guaranteed, and so what is checked:
# - A resume in the same layout repeats the same operations in the same order on the same
#   restored state: bit for bit. Its losses are compared exactly, and bf16's weights and Adam
#   state too.
# - Another layout (TP, PP or DP size) computes the same sums in another order: TP adds partial
#   matmul sums across ranks, and the gradient norm that clipping divides by is summed over other
#   shards. The result agrees to float32 rounding, and whether the last printed digit agrees
#   depends on the CPU's kernels (seen: TP=2 then TP=1 gave 4.552752 against 4.552751 on an
#   AVX-512 machine and the same digits on others). LAYOUT_RTOL is 9 units of that digit: a real
#   divergence, such as Adam steps not restored (2e-5 two steps after the resume), is outside it.
LAYOUT_RTOL = 2e-6


def assert_same_to_rounding(got, want):
    assert sorted(got) == sorted(want), (got, want)
    for i, value in want.items():
        assert abs(float(got[i]) - float(value)) <= LAYOUT_RTOL * abs(float(value)), (i, got, want)


def checkpoint_tensors(iteration_dir):
    """Every tensor of a torch_dist checkpoint, read in this process (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    import megatron.core  # noqa: F401  (registers numpy as safe: the RNG object holds arrays)

    target = iteration_dir.rstrip("/") + ".pt"
    dcp_to_torch_save(iteration_dir, target)
    state = torch.load(target, weights_only=True)
    os.remove(target)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def checkpoint_at(reference_dir, iteration, target):
    """A copy of the reference run's checkpoints as they were at ``iteration``."""
    shutil.copytree(reference_dir, target)
    for name in os.listdir(target):
        if name.startswith("iter_") and int(name[5:12]) > iteration:
            shutil.rmtree(os.path.join(target, name))
    with open(os.path.join(target, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
    return target


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    save = str(tmp_path_factory.mktemp("reference") / "ckpt")
    result = run(["--save", save, "--save-interval", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    return save, result.stdout, losses(result.stdout)


def test_patch_stage_trains_logs_evaluates_and_saves(reference):
    save, stdout, by_iter = reference
    assert sorted(by_iter) == list(range(1, 9))
    values = [float(by_iter[i]) for i in range(1, 9)]
    assert sum(values[-3:]) / 3 < values[0] - 0.1, values  # the loss falls
    lines = log_reading.training_lines(stdout)
    assert lines[1]["consumed tokens"] == "128"  # 4 samples x 32 tokens
    assert "tokens per second" in lines[1] and "throughput per device (TFLOP/s)" in lines[1]
    evals = log_reading.validation_lines(stdout)
    assert [(stage, iteration) for stage, iteration, _ in evals] == [("patch", 4), ("patch", 8)]
    assert all(list(values) == ["patch loss", "token nll (K=1)", "token ppl (K=1)"]
               and all(float(v) > 0 for v in values.values()) for _, _, values in evals)
    # Megatron-LM's layout, nothing half-written, and pickled only what Megatron-LM pickles.
    assert latest(save) == 8
    assert sorted(os.listdir(save)) == [".lock", "iter_0000002", "iter_0000004", "iter_0000006",
                                        "iter_0000008", "latest_checkpointed_iteration.txt"]
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = FileSystemReader(os.path.join(save, "iter_0000008")).read_metadata()
    pickled = {k.split("/")[0] for k, v in metadata.state_dict_metadata.items()
               if isinstance(v, BytesStorageMetadata)}
    assert pickled == {"rng_state"} | {f"decoder.layers.{m}._extra_state" for m in (
        "self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")}
    assert any(k.startswith("optimizer.") for k in metadata.state_dict_metadata)
    from patch_megatron.training import safe_load
    from patch_megatron.training.checkpoint_record import read_record

    common = safe_load.read_common(os.path.join(save, "iter_0000008"))
    record = read_record(common, save)
    assert record.patch_size == 4 and record.stage == "patch" and record.schema_version == 2
    assert record.iteration == 8 and record.consumed_train_samples == 32
    assert common["args"].consumed_train_samples == 32 and common["args"].patch_size == 4
    assert record.flags["patch_size"] == 4


@pytest.mark.parametrize("layout", [
    ["--pipeline-model-parallel-size", "2", "--ckpt-format", "torch"],
    ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
], ids=["PP=2+legacy-format", "TP=2+SP"])
def test_two_process_layouts_continue_a_single_process_checkpoint(reference, layout, tmp_path):
    """Same weights, data and optimizer state in, same losses out, under gloo with 2 ranks."""
    ref_dir, _, ref_losses = reference
    load = checkpoint_at(ref_dir, 4, str(tmp_path / "ckpt"))
    save = str(tmp_path / "resaved")
    result = run(["--load", load, "--save", save, "--save-interval", "2"] + layout, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded" in result.stdout and "parallel layout differs" in result.stdout
    got = losses(result.stdout)
    assert_same_to_rounding(got, {i: ref_losses[i] for i in range(5, 9)})
    reloaded = checkpoint_at(save, 6, str(tmp_path / "at_6"))
    if layout[0] == "--tensor-model-parallel-size":
        # ... and the TP=2 checkpoint loads back into one process.
        back = run(["--load", reloaded])
    else:
        # ... and the PP=2 checkpoint, in Megatron-LM's legacy format (a file per pipeline
        # rank), resumes at PP=2, RNG states included.
        assert sorted(os.listdir(os.path.join(reloaded, "iter_0000006"))) == [
            "checksums.json", "mp_rank_00_000", "mp_rank_00_001"]
        back = run(["--load", reloaded] + layout, nproc=2)
        assert "RNG state not restored" not in back.stdout
    assert back.returncode == 0, back.stderr[-3000:]
    assert_same_to_rounding(losses(back.stdout), {i: ref_losses[i] for i in (7, 8)})


def test_data_parallel_with_overlapped_sharded_reduction_matches_one_process(reference):
    """DP=2: gradient buckets reduce-scattered during the backward pass, optimizer sharded."""
    result = run(["--overlap-grad-reduce", "--use-distributed-optimizer"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_to_rounding(losses(result.stdout), reference[2])


def test_overlapped_parameter_gather_matches_one_process_and_saves_the_current_weights(
        reference, tmp_path):
    # --overlap-param-gather: the updated parameters are gathered during the next forward.
    # Between steps they wait for that all-gather; a save must not write the previous step's:
    # the weights at iteration 4 equal the one-process run's. No evaluation (its forward pass
    # would gather them before the save; the training losses do not depend on it).
    save = str(tmp_path / "ckpt")
    result = run(["--overlap-grad-reduce", "--use-distributed-optimizer", "--overlap-param-gather",
                  "--save", save, "--save-interval", "4", "--eval-iters", "0"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_to_rounding(losses(result.stdout), reference[2])
    ours = checkpoint_tensors(os.path.join(save, "iter_0000004"))
    theirs = checkpoint_tensors(os.path.join(reference[0], "iter_0000004"))
    weights = [k for k in theirs if k.startswith(("embedding.", "decoder.", "output_layer."))]
    assert weights
    for name in weights:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7, msg=name)


def test_save_retain_interval_and_an_interleaved_pipeline_continuing_its_checkpoint(tmp_path):
    # 4 layers, PP=2 with 2 model chunks of 1 layer per rank (megatron-core's interleaved
    # schedule): from the one-process run's iteration 2 it trains, evaluates and saves as that
    # run does; its checkpoint holds the chunks as Megatron-LM's model0/model1, the same weights.
    # The one-process run also checks --save-retain-interval (a launch saved): of its saves at
    # 1..4 with interval 2, 1 and 3 are deleted once the next is latest, as in Megatron-LM.
    deep = ["--num-layers", "4", "--train-iters", "4", "--eval-interval", "2"]
    one, at_two, interleaved = (str(tmp_path / name) for name in ("one", "at_two", "interleaved"))
    first = run(deep + ["--save", one, "--save-interval", "1", "--save-retain-interval", "2"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(n for n in os.listdir(one) if n.startswith("iter_")) == ["iter_0000002",
                                                                          "iter_0000004"]
    assert first.stdout.count("> deleted") == 2
    shutil.copytree(os.path.join(one, "iter_0000002"), os.path.join(at_two, "iter_0000002"))
    with open(os.path.join(at_two, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("2")
    result = run(deep + ["--pipeline-model-parallel-size", "2",
                         "--num-layers-per-virtual-pipeline-stage", "1", "--load", at_two,
                         "--save", interleaved], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    want = losses(first.stdout)
    assert_same_to_rounding(losses(result.stdout), {i: want[i] for i in (3, 4)})
    evaluated = {i: values for _, i, values in log_reading.validation_lines(result.stdout)}
    expected = {i: values for _, i, values in log_reading.validation_lines(first.stdout)}
    assert list(evaluated) == [4] and evaluated[4].keys() == expected[4].keys()
    assert_same_to_rounding(evaluated[4], expected[4])
    ours = checkpoint_tensors(os.path.join(interleaved, "iter_0000004"))
    theirs = checkpoint_tensors(os.path.join(one, "iter_0000004"))
    weights = [k for k in theirs if k.startswith(("embedding.", "decoder.", "output_layer."))]
    assert ours["decoder.layers.mlp.linear_fc2.weight"].shape[0] == 4  # the layers, stacked
    for name in weights:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7, msg=name)


# bf16 with megatron's distributed optimizer: the GPU recipe's precision and optimizer, run on
# CPU. Two data-parallel ranks, so the optimizer state really is sharded.
BF16_DISTRIBUTED = ["--bf16", "--use-distributed-optimizer"]


@pytest.fixture(scope="module")
def bf16_reference(tmp_path_factory):
    save = str(tmp_path_factory.mktemp("bf16") / "ckpt")
    result = run(BF16_DISTRIBUTED + ["--save", save, "--save-interval", "4"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return save, losses(result.stdout)


def test_bf16_distributed_optimizer_keeps_fp32_master_weights_and_resumes_exactly(
        bf16_reference, tmp_path):
    save, ref_losses = bf16_reference
    values = [float(ref_losses[i]) for i in range(1, 9)]
    assert sum(values[-3:]) / 3 < values[0] - 0.1, values
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(os.path.join(save, "iter_0000008")).read_metadata()
    dtypes = {k: v.properties.dtype for k, v in metadata.state_dict_metadata.items()
              if hasattr(v, "properties")}
    assert dtypes["decoder.layers.self_attention.linear_qkv.weight"] == torch.bfloat16
    master = [k for k in dtypes if k.startswith("optimizer.") and k.endswith(".param")]
    assert master and all(dtypes[k] == torch.float32 for k in master), master
    from patch_megatron.training import safe_load

    common = safe_load.read_common(os.path.join(save, "iter_0000008"))
    assert common["content_metadata"]["distrib_optim_sharding_type"] == "dp_reshardable"
    # The same layout continues bit for bit: losses, bf16 weights, fp32 master weights, Adam moments.
    load = checkpoint_at(save, 4, str(tmp_path / "dp2"))
    result = run(BF16_DISTRIBUTED + ["--load", load, "--save", load, "--save-interval", "4"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(result.stdout) == {i: ref_losses[i] for i in range(5, 9)}
    want, got = (checkpoint_tensors(os.path.join(d, "iter_0000008")) for d in (save, load))
    assert want.keys() == got.keys() and any(".exp_avg_sq" in k for k in want)
    for name, tensor in want.items():
        if not name.startswith("rng_state."):
            assert torch.equal(got[name], tensor), name
    # Another data-parallel size continues with the same losses, to rounding (LAYOUT_RTOL).
    load = checkpoint_at(save, 4, str(tmp_path / "dp1"))
    result = run(BF16_DISTRIBUTED + ["--load", load], nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_to_rounding(losses(result.stdout), {i: ref_losses[i] for i in range(5, 9)})


def test_weights_only_loads_reach_the_bf16_master_weights(reference, bf16_reference, tmp_path):
    """--no-load-optim at another layout: bf16 follows fp32 doing the same, to bf16 precision.

    The optimizer's fp32 master weights are copied from the initialisation when it
    is built; a load that skips the optimizer state must refresh them from the
    loaded weights, or the first step puts the initialisation back.
    """
    fp32 = run(["--load", checkpoint_at(reference[0], 4, str(tmp_path / "fp32")), "--no-load-optim"])
    assert fp32.returncode == 0, fp32.stderr[-3000:]
    bf16_load = checkpoint_at(bf16_reference[0], 4, str(tmp_path / "bf16"))
    tp2 = BF16_DISTRIBUTED + ["--load", bf16_load, "--tensor-model-parallel-size", "2"]
    bf16 = run(tp2 + ["--no-load-optim"], nproc=2)
    assert bf16.returncode == 0, bf16.stderr[-3000:]
    want, got = losses(fp32.stdout), losses(bf16.stdout)
    assert sorted(got) == list(range(5, 9))
    assert all(abs(float(got[i]) - float(want[i])) < 0.01 for i in got), (got, want)
    # Without --no-load-optim the sharded optimizer state cannot follow to TP=2: refused.
    refused = run(tp2, nproc=2)
    assert refused.returncode != 0
    assert "cannot be resharded" in refused.stderr and "--no-load-optim" in refused.stderr


def test_fp16_saves_before_its_first_step_and_resumes_with_its_loss_scale(tmp_path):
    """fp16 skips its first steps while the dynamic loss scale falls from 2^32."""
    fp16 = ["--fp16", "--use-distributed-optimizer", "--train-iters", "4", "--eval-iters", "0",
            "--hysteresis", "1"]  # halve the scale at every overflow (Megatron-LM's default: 2)
    save = str(tmp_path / "ckpt")
    first = run(fp16 + ["--save", save, "--save-interval", "2"])
    assert first.returncode == 0, first.stderr[-3000:]
    second = log_reading.training_lines(first.stdout)[2]
    assert second["loss scale"] == "1073741824.0"  # 2^32 halved twice
    assert second["number of skipped iterations"] == "2"
    resumed = run(fp16 + ["--load", checkpoint_at(save, 2, str(tmp_path / "at2"))])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(resumed.stdout) == {i: losses(first.stdout)[i] for i in (3, 4)}
    skipped = "number of skipped iterations"
    assert log_reading.training_lines(resumed.stdout)[4][skipped] == \
        log_reading.training_lines(first.stdout)[4][skipped]


def test_sigkill_at_any_moment_then_resume_gives_the_same_losses(reference, tmp_path):
    _, _, ref_losses = reference
    save = str(tmp_path / "ckpt")
    # Megatron-LM's default reader processes (IN_PROCESS_READING): a kill reaches them too
    process = subprocess.Popen(command(["--save", save, "--save-interval", "2", "--num-workers", "2"]),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=environment(), cwd=REPO, start_new_session=True)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if re.search(r"iteration\s+4/", line):  # the eval and the save of iteration 4 follow
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "".join(seen)[-2000:]
    resumed_from = latest(save)
    assert resumed_from in (2, 4)
    assert os.path.exists(os.path.join(save, f"iter_{resumed_from:07d}", "common.pt"))
    if os.path.exists(os.path.join(save, "iter_0000004.incomplete")):
        assert resumed_from == 2  # a half-written checkpoint never becomes latest
    result = run(["--load", save, "--save", save, "--save-interval", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"(iteration {resumed_from})" in result.stdout
    assert losses(result.stdout) == {i: ref_losses[i] for i in range(resumed_from + 1, 9)}
    assert latest(save) == 8 and not any(n.endswith(".incomplete") for n in os.listdir(save))


def test_sigterm_with_exit_signal_handler_saves_and_exits_zero(tmp_path):
    save = str(tmp_path / "ckpt")
    process = subprocess.Popen(command(["--save", save, "--exit-signal-handler", "--num-workers", "2"]),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=environment(), cwd=REPO)
    output = []
    for line in process.stdout:
        output.append(line)
        if re.search(r"iteration\s+2/", line):
            process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    text = "".join(output)
    assert process.returncode == 0, text[-2000:]
    stopped = int(re.search(r"SIGTERM received at iteration (\d+)", text).group(1))
    assert 2 <= stopped < 8
    assert latest(save) == stopped


def test_nan_loss_stops_is_rerun_or_is_skipped(tmp_path):
    # lr 1e30 (from iteration 2, after one warmup step) blows the weights up within a few steps:
    # first the gradients turn NaN/Inf (the loss still finite), then the loss.
    diverge = ["--lr", "1e30", "--clip-grad", "0", "--eval-iters", "0", "--train-iters", "6"]
    non_finite = r"the (?:training loss is nan|gradients hold NaN/Inf)"
    # Without the rerun machine, the loop's own checks stop the run.
    stop = run(diverge + ["--rerun-mode", "disabled"])
    assert stop.returncode == 4, stop.stderr[-2000:]
    nan_at = int(re.search(rf"error: iteration (\d+): {non_finite}; stopping without saving",
                           stop.stderr).group(1))
    assert 2 < nan_at <= 6
    assert set(losses(stop.stdout)) == set(range(1, nan_at))  # it stopped right there
    # Megatron-LM's default (--rerun-mode validate_results): the machine reruns the step, the
    # NaN/Inf repeats, and the weights before the step are saved for a rerun on another GPU.
    validated_save = str(tmp_path / "validated")
    validated = run(diverge + ["--save", validated_save])
    assert validated.returncode == 16, validated.stderr[-2000:]
    assert re.search(rf"iteration #{nan_at}: First rerun: unexpected result is reproducible "
                     r"within the tolerance \((\S+) = \1\)", validated.stderr)
    assert latest(validated_save) == nan_at - 1
    weights = checkpoint_tensors(os.path.join(validated_save, f"iter_{nan_at - 1:07d}"))
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    # Skipping: no step with a NaN/Inf loss or gradient is applied, so the weights stay finite
    # and the run ends well, its last checkpoint finite too.
    skipped_save = str(tmp_path / "skipped")
    skip = run(diverge + ["--nan-action", "skip", "--save", skipped_save])
    assert skip.returncode == 0, skip.stderr[-2000:]
    assert re.search(rf"WARNING: iteration {nan_at}: {non_finite}; update skipped", skip.stdout)
    assert int(log_reading.training_lines(skip.stdout)[6]["number of skipped iterations"]) >= 1
    weights = checkpoint_tensors(os.path.join(skipped_save, "iter_0000006"))
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    # Saving every step: the first step whose weights are not finite is never written.
    save = str(tmp_path / "ckpt")
    guarded = run(diverge + ["--save", save, "--save-interval", "1", "--rerun-mode", "disabled"])
    assert guarded.returncode in (3, 4), guarded.stderr[-2000:]
    bad_at = int(re.search(rf"error: iteration (\d+): the (?:weights hold NaN/Inf|training loss "
                           rf"is nan|gradients hold NaN/Inf)", guarded.stderr).group(1))
    assert latest(save) == bad_at - 1
    assert not any(n.startswith(f"iter_{bad_at:07d}") for n in os.listdir(save))
    common = torch.load(os.path.join(save, f"iter_{bad_at - 1:07d}", "common.pt"), weights_only=True)
    assert common["iteration"] == bad_at - 1


def test_a_run_never_ends_well_with_non_finite_weights(tmp_path):
    # lr 3e38: the first real update (finite gradients) takes the weights past float32's range.
    result = run(["--lr", "3e38", "--clip-grad", "0", "--eval-iters", "0", "--train-iters", "4",
                  "--nan-action", "skip"])
    assert result.returncode == 4, result.stderr[-2000:]
    assert re.search(r"error: iteration 4: the weights hold NaN/Inf at the end of training "
                     r"\(nothing was saved\); rerun or resume with a lower --lr", result.stderr)
    assert "Traceback" not in result.stderr and "stage finished" not in result.stdout


def test_patch_stage_on_the_real_data_pipeline(builtin_data_prefix, sentencepiece_model, tmp_path):
    """--data-path/--tokenizer-*: the data pipeline's stage datasets, the λ split, eval at K=1."""
    real = ["--data-path", builtin_data_prefix, "--tokenizer-type", "GPTSentencePieceTokenizer",
            "--tokenizer-model", sentencepiece_model, "--data-cache-path", str(tmp_path / "cache"),
            "--split", "90,10,0", "--seq-length", "16", "--train-iters", "10"]
    flags = [f for f in FLAGS if f != "--mock-data"]
    i = flags.index("--vocab-size")
    flags = flags[:i] + flags[i + 2:]
    result = subprocess.run([sys.executable, SCRIPT] + flags + real, capture_output=True,
                            text=True, env=environment(), timeout=240, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    values = [float(v) for _, v in sorted(losses(result.stdout).items())]
    assert len(values) == 10 and sum(values[-3:]) / 3 < values[0] - 0.1, values
    assert "token nll (K=1) value:" in result.stdout
    assert "64 tokens/sample" in result.stdout  # K*T tokens per patch-stage sample


def test_the_log_names_the_implementation_instead_of_megatrons_fallback_warnings():
    env = {k: v for k, v in environment().items() if k != "PYTHONWARNINGS"}
    result = subprocess.run([sys.executable, SCRIPT] + FLAGS + ["--train-iters", "2"],
                            capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"> layers: .+; Adam: .+", result.stdout)
    assert "not installed" not in result.stderr and "deprecated" not in result.stderr, result.stderr


def test_unknown_flag_fails_before_any_process_group():
    result = subprocess.run([sys.executable, SCRIPT] + FLAGS + ["--hidden-sise", "8"],
                            capture_output=True, text=True, env=environment(), timeout=60)
    assert result.returncode == 2
    assert "unrecognized arguments: --hidden-sise" in result.stderr and "--help" in result.stderr
    assert "Traceback" not in result.stderr


BAD_LOADS = textwrap.dedent("""
    import contextlib, io, json, os, shutil, sys
    import torch
    sys.argv = ["pretrain_patch_gpt.py"]
    sys.path.insert(0, {repo!r})
    from pretrain_patch_gpt import main

    flags, ckpt, work = {flags!r}, {ckpt!r}, {work!r}
    def attempt(extra):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(flags + extra)
        return rc, err.getvalue()

    results = {{}}
    results["shape"] = attempt(["--load", ckpt, "--ffn-hidden-size", "64"])
    results["patch_size"] = attempt(["--patch-size", "1", "--load", ckpt])  # last flag wins
    results["finetune"] = attempt(["--patch-size", "1", "--load", ckpt, "--finetune",
                                   "--train-iters", "1", "--lr-warmup-iters", "0"])
    evil = os.path.join(work, "evil")
    shutil.copytree(ckpt, evil)
    common = os.path.join(evil, "iter_0000008", "common.pt")
    state = torch.load(common, weights_only=True)
    state["payload"] = os.getcwd  # a callable: what a malicious pickle would smuggle in
    torch.save(state, common)
    results["unpickle"] = attempt(["--load", evil])
    results["optimizer"] = attempt(["--load", ckpt, "--use-distributed-optimizer"])
    print(json.dumps(results))
""")


def test_incompatible_or_unsafe_checkpoints_get_clear_errors(reference, tmp_path):
    ckpt, _, _ = reference
    code = BAD_LOADS.format(repo=REPO, flags=FLAGS, ckpt=ckpt, work=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=environment(), timeout=180, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    results = json.loads(result.stdout.strip().splitlines()[-1])
    rc, err = results["shape"]
    assert rc == 3 and "another model shape" in err and "ffn_hidden_size: checkpoint 128 vs run 64" in err
    rc, err = results["patch_size"]
    assert rc == 3 and "patch size 4 but this run has --patch-size 1" in err
    assert "convert_patch_to_token.py" in err and "--finetune" in err
    assert results["finetune"][0] == 0, results["finetune"][1]  # weights only: the handoff
    rc, err = results["unpickle"]
    assert rc == 3 and "refusing to unpickle" in err
    rc, err = results["optimizer"]
    assert rc == 3 and "a run without --use-distributed-optimizer" in err and "--no-load-optim" in err


# --rampup-batch-size 4 4 40 to a global batch of 12 over --train-samples 100, with a warmup of
# 90 samples that lasts the whole run: each logged learning rate (read before its step) is then
# lr x (samples the scheduler was stepped by so far) / 90.
RAMP, RAMP_GLOBAL, RAMP_SAMPLES, RAMP_WARMUP = (4, 4, 40), 12, 100, 90
RAMP_RUNS = textwrap.dedent("""
    import contextlib, io, json, os, shutil, sys
    sys.argv = ["pretrain_patch_gpt.py"]
    sys.path.insert(0, {repo!r})
    from pretrain_patch_gpt import main

    flags, work, resume_at = {flags!r}, {work!r}, {resume_at!r}
    def attempt(extra):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(flags + extra)
        return rc, out.getvalue(), err.getvalue()

    full, resumed = os.path.join(work, "full"), os.path.join(work, "resumed")
    results = {{"full": attempt(["--save", full, "--save-interval", "3"])}}
    results["saved"] = sorted(n for n in os.listdir(full) if n.startswith("iter_"))
    shutil.copytree(full, resumed)  # as the uninterrupted run's directory was at resume_at
    for name in os.listdir(resumed):
        if name.startswith("iter_") and int(name[5:]) > resume_at:
            shutil.rmtree(os.path.join(resumed, name))
    with open(os.path.join(resumed, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(resume_at))
    results["resumed"] = attempt(["--load", resumed, "--save", resumed])
    print(json.dumps(results))
""")


def test_a_ramped_run_follows_megatron_lms_ramp_and_resumes_inside_it(tmp_path):
    """The batches, the scheduler's steps and the checkpoints of a ramped run (one process
    trains it, then resumes a copy from inside the ramp)."""
    from ramp_reference import step_batches

    constant = {"--train-iters", "--lr-warmup-iters", "--global-batch-size", "--eval-iters"}
    flags = [f for i, f in enumerate(FLAGS) if f not in constant and FLAGS[i - 1] not in constant]
    flags += ["--global-batch-size", str(RAMP_GLOBAL), "--train-samples", str(RAMP_SAMPLES),
              "--rampup-batch-size", *map(str, RAMP), "--lr-warmup-samples", str(RAMP_WARMUP),
              "--eval-iters", "0"]
    expected = step_batches(*RAMP, RAMP_GLOBAL, RAMP_SAMPLES)  # [4]*5 + [8]*3 + [12]*4
    resume_at = 6  # two steps into the batch-8 stretch
    code = RAMP_RUNS.format(repo=REPO, flags=flags, work=str(tmp_path), resume_at=resume_at)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=environment(), timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    results = json.loads(result.stdout.strip().splitlines()[-1])
    rc, out, err = results["full"]
    assert rc == 0, err[-3000:]
    lines = log_reading.training_lines(out)
    assert sorted(lines) == list(range(1, len(expected) + 1))
    assert [int(lines[i + 1]["global batch size"]) for i in range(len(expected))] == expected
    consumed = [sum(expected[:i]) for i in range(len(expected) + 1)]
    assert [int(lines[i]["consumed samples"]) for i in lines] == consumed[1:]
    lrs = [float(lines[i + 1]["learning rate"]) for i in range(len(expected))]
    assert lrs == pytest.approx([3e-3 * c / RAMP_WARMUP for c in consumed[:-1]], rel=1e-6)
    # Megatron-LM saves before each step of a larger batch, besides --save-interval and the end.
    grown = {i for i in range(1, len(expected)) if expected[i] != expected[i - 1]}
    assert results["saved"] == [f"iter_{i:07d}" for i in sorted(
        grown | set(range(3, len(expected) + 1, 3)) | {len(expected)})]

    rc, out, err = results["resumed"]
    assert rc == 0, err[-3000:]
    assert f"(iteration {resume_at})" in out
    after = log_reading.training_lines(out)
    assert sorted(after) == list(range(resume_at + 1, len(expected) + 1))
    assert [int(after[i]["global batch size"]) for i in sorted(after)] == expected[resume_at:]
    assert losses(out) == {i: losses(results["full"][1])[i] for i in after}  # bit for bit


def _another_runs_checkpoints(save):
    """A --save as another run left it: iterations 4 and 8 (the guards only read the names)."""
    for iteration in (4, 8):
        os.makedirs(os.path.join(save, f"iter_{iteration:07d}"))
        with open(os.path.join(save, f"iter_{iteration:07d}", "common.pt"), "w") as f:
            f.write(f"iteration {iteration}")
    with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("8")
    return sorted(os.listdir(save))


def _one_line_error(result, code=2):
    assert result.returncode == code, result.stderr[-2000:]
    # (megatron's checkpoint writer may add its own "Local process ... encountered an error")
    errors = [line for line in result.stderr.splitlines()
              if line.startswith("pretrain_patch_gpt.py: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return errors[0]


def test_a_run_from_scratch_never_writes_over_another_runs_checkpoints(tmp_path):
    save = str(tmp_path / "ckpt")
    before = _another_runs_checkpoints(save)
    short = ["--save", save, "--save-interval", "2", "--train-iters", "2", "--eval-iters", "0"]
    for load in ([], ["--load", str(tmp_path / "cktp")]):  # absent, and a typo
        error = _one_line_error(run(short + load))
        assert f"--save {save} already holds checkpoints, and this run starts from scratch" in error
        assert f"pass --load {save} to resume" in error and "--overwrite-save" in error
        assert sorted(os.listdir(save)) == before and latest(save) == 8
    over = run(short + ["--overwrite-save"])
    assert over.returncode == 0, over.stderr[-2000:]
    assert latest(save) == 2


def test_a_second_run_on_a_locked_save_is_refused(tmp_path):
    import fcntl

    save = str(tmp_path / "ckpt")
    os.makedirs(save)
    with open(os.path.join(save, ".lock"), "w") as held:  # as the first run's rank 0 holds it
        held.write("pid 12345 on elsewhere\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        error = _one_line_error(run(["--save", save, "--save-interval", "2"]))
    assert f"--save {save} is in use by another run (pid 12345 on elsewhere holds" in error
    assert "choose another --save" in error
    assert sorted(os.listdir(save)) == [".lock"]


def _mount_tmpfs(path, options):
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path],
                             capture_output=True).returncode == 0
    return mounted


def test_unusable_save_directories_are_refused_before_training(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    error = _one_line_error(run(["--save", str(a_file)]))
    assert f"--save {a_file} is a file, not a directory" in error
    read_only = str(tmp_path / "read_only")
    if os.geteuid() != 0:
        os.makedirs(read_only)
        os.chmod(read_only, 0o555)
    elif not _mount_tmpfs(read_only, "size=1m,ro"):
        pytest.skip("root cannot be kept from writing without a read-only mount")
    try:
        error = _one_line_error(run(["--save", read_only]))
        assert f"--save {read_only} is not writable" in error and "iteration" not in error
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", read_only])


def test_a_full_disk_is_found_before_training_and_at_save_time(tmp_path):
    small, roomy = str(tmp_path / "small"), str(tmp_path / "roomy")
    # One checkpoint of this model (FFN 192) is ~1.6 MB: 1 MB holds none, 4 MB holds two.
    wide = ["--ffn-hidden-size", "192"]
    if not (_mount_tmpfs(small, "size=1m") and _mount_tmpfs(roomy, "size=4m")):
        pytest.skip("needs small filesystems (tmpfs mounts)")
    try:
        result = run(["--save", small, *wide])
        error = _one_line_error(result)
        assert f"--save {small} has " in error and "one checkpoint needs about" in error
        assert " iteration " not in result.stdout  # not one step was taken
        result = run(["--save", roomy, "--save-interval", "2", *wide])
        error = _one_line_error(result, code=3)
        assert (f"no space left on device while saving to --save {roomy}: the last good checkpoint "
                "(iteration 4) stays latest") in error
        assert latest(roomy) == 4 and sorted(os.listdir(roomy)) == [
            ".lock", "iter_0000002", "iter_0000004", "latest_checkpointed_iteration.txt"]
    finally:
        for path in (small, roomy):
            subprocess.run(["umount", path], capture_output=True)


def _children(pid):
    """{child pid: its command line} of ``pid``, from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG")
def test_a_run_killed_mid_save_leaves_no_child_processes(tmp_path):
    save = str(tmp_path / "ckpt")
    process = subprocess.Popen(
        command(["--save", save, "--save-interval", "1", "--train-iters", "2000", "--eval-iters",
                 "0", "--log-interval", "100", "--num-workers", "2"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment(), cwd=REPO)
    seen, writer_seen = {}, False
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            children = _children(process.pid)
            for pid in list(children):
                children.update(_children(pid))  # grandchildren too
            seen.update(children)
            # A forked checkpoint writer runs the parent's command line; the helpers do not.
            if any(SCRIPT in line and "multiprocessing" not in line for line in children.values()) \
                    and any("multiprocessing" in line for line in seen.values()):
                writer_seen = True
                break
            time.sleep(0.005)
        assert writer_seen, f"no checkpoint writer seen: {seen}"
    finally:
        process.kill()  # SIGKILL: no handler, no cleanup in the run
        process.wait(timeout=30)
    survivors = {}
    for _ in range(100):  # the kernel's death signals and the tracker's EOF take a moment
        survivors = {pid: line for pid, line in seen.items() if _alive(pid)}
        if not survivors:
            break
        time.sleep(0.1)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)  # do not leave them to the next test
    assert not survivors, survivors
