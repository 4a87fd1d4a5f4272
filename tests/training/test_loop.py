"""The loop's schedule of evaluations and saves, and what its log lines report.

The loop runs here with its optimizer step and evaluation replaced by stand-ins
that record when they are called, so these tests check the loop's own
decisions in one process; tests/test_pretrain_patch_gpt.py runs the real thing.
"""

import math
import os
import types

import pytest
import torch

from patch_megatron.model.shape import ModelShape
from patch_megatron.training import batch_rampup, loop, metrics
from patch_megatron.training.arguments import StagePlan
from patch_megatron.training.log_reading import training_lines, validation_lines
from patch_megatron.llama_recipe import RECIPE_FLAGS



def fake_run(train_iters, *, eval_interval=2, eval_iters=1, save_interval=None, exit_interval=None,
             log_interval=1, valid=True, save=False, global_batch_size=2, rampup=None,
             micro_batch_size=1):
    """A loop.Run of stand-ins; megatron-core's batch calculator is real (the ``calculator``
    fixture tears it down)."""
    events = []
    args = types.SimpleNamespace(
        eval_iters=eval_iters, eval_interval=eval_interval, log_interval=log_interval,
        save="ckpt" if save or save_interval or exit_interval else None, save_interval=save_interval,
        exit_interval=exit_interval, exit_duration_in_mins=None, exit_signal_handler=False,
        est=False, nan_action="stop", tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        fp16=False, profile=False, profile_step_start=10, profile_step_end=12, profile_ranks=[0],
        use_pytorch_profiler=False, overlap_param_gather=False, manual_gc=False,
        manual_gc_interval=0, manual_gc_eval=True,
        steps=[],  # the stand-in train_step's record: (iteration, micro-batches, global batch)
    )
    plan = StagePlan(name="token", patch_size=1, seq_length=8, global_batch_size=global_batch_size,
                     train_iters=train_iters, lr_warmup_samples=0, lr_decay_samples=2 * train_iters,
                     data_start_token=0, rampup_batch_size=rampup)
    scheduler = types.SimpleNamespace(optimizer=types.SimpleNamespace(param_groups=[{"lr": 1e-3}]))
    run = loop.Run(
        args=args, plan=plan, model=[types.SimpleNamespace(module=torch.nn.Linear(2, 2))],
        optimizer=None, scheduler=scheduler,
        data=types.SimpleNamespace(train=[], valid=[] if valid else None, valid_tokens=None),
        make_batches=lambda dataset, consumed=0: iter(()), num_microbatches=1,
        step_batches=batch_rampup.StepBatches(plan, micro_batch_size, dp_size=1, rank=0),
        shape=ModelShape(num_layers=2, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2,
                         vocab_size=64),
        peak_tflops=None, world_size=1, print=lambda line: events.append(("print", line)),
        tensorboard=metrics.TensorBoard(args, enabled=False),
        save=lambda state: events.append(("save", state.iteration)),
    )
    return run, events


@pytest.fixture(autouse=True)
def calculator():
    """fake_run's megatron-core calculator is global state: gone after each test."""
    yield
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    destroy_num_microbatches_calculator()


@pytest.fixture
def stand_ins(monkeypatch):
    """One optimizer step = loss 2.0; one evaluation = lm loss 1.5 (recorded as it happens);
    each step's (iteration, micro-batches, global batch) goes into ``run.args.steps``."""
    def train_step(model, optimizer, scheduler, batches, num_microbatches, global_batch_size,
                   args, iteration):
        args.steps.append((iteration, num_microbatches, global_batch_size))
        return loop.StepResult(loss=2.0, grad_norm=0.5, skipped=False)

    def evaluate(model, make_batches, data, num_microbatches, args, plan):
        return {"lm loss": 1.5, "lm loss PPL": math.exp(1.5)}

    monkeypatch.setattr(loop, "train_step", train_step)
    monkeypatch.setattr(loop, "evaluate", evaluate)


def evaluated_at(events):
    return [iteration for kind, line in events if kind == "print"
            for _, iteration, _ in validation_lines(line)]


@pytest.mark.parametrize("train_iters, eval_interval, expected", [
    (5, 2, [2, 4, 5]),  # the last iteration is off the interval: evaluated once more
    (4, 2, [2, 4]),  # the last iteration was just evaluated: not twice
    (3, 10, [3]),  # no evaluation on the interval at all: still one at the end
])
def test_a_finished_run_ends_with_a_validation_of_its_last_iteration(
        stand_ins, train_iters, eval_interval, expected):
    run, events = fake_run(train_iters, eval_interval=eval_interval)
    reason = loop.train(run, loop.TrainState())
    assert reason == f"token stage finished: {train_iters} iterations"
    assert evaluated_at(events) == expected
    # The same line format as every other evaluation (what examples/quickstart.py parses).
    last = [line for kind, line in events if kind == "print" and validation_lines(line)][-1]
    assert last == (f" validation token stage at iteration {train_iters} | lm loss value: "
                    f"1.500000E+00 | lm loss PPL value: {math.exp(1.5):.6E} |")


def test_final_validation_follows_the_final_save_as_in_megatron_lm(stand_ins):
    run, events = fake_run(5, eval_interval=2, save_interval=2)
    loop.train(run, loop.TrainState())
    tail = [(kind, line if kind == "save" else evaluated_at([(kind, line)]))
            for kind, line in events if kind == "save" or validation_lines(line)]
    assert tail == [("print", [2]), ("save", 2), ("print", [4]), ("save", 4), ("save", 5),
                    ("print", [5])]


def test_no_final_validation_without_eval_iters_or_validation_data(stand_ins):
    for options in ({"eval_iters": 0}, {"valid": False}):
        run, events = fake_run(5, **options)
        with run.step_batches:  # megatron-core holds one calculator at a time
            loop.train(run, loop.TrainState())
        assert evaluated_at(events) == []


def test_an_early_exit_saves_and_stops_without_a_final_validation(stand_ins):
    run, events = fake_run(8, eval_interval=2, exit_interval=3)
    reason = loop.train(run, loop.TrainState())
    assert reason == "--exit-interval 3 reached at iteration 3"
    assert evaluated_at(events) == [2]
    assert ("save", 3) in events


def test_a_resumed_finished_run_is_validated_once(stand_ins):
    run, events = fake_run(4, eval_interval=3)
    loop.train(run, loop.TrainState(iteration=4, consumed_samples=8))
    assert evaluated_at(events) == [4]


@pytest.mark.parametrize("interval, around_eval", [(2, True), (3, False), (0, True)])
def test_manual_gc_collects_at_megatron_lms_points_only(monkeypatch, interval, around_eval):
    import gc

    run, events = fake_run(6, eval_interval=4)  # evaluations at 4 and (the final one) 6
    run.args.manual_gc, run.args.manual_gc_interval = True, interval
    run.args.manual_gc_eval = around_eval
    collections = []

    def on_gc(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    def train_step(model, optimizer, scheduler, batches, num_microbatches, global_batch_size, args,
                   iteration):
        events.append(("step", iteration, gc.isenabled(), len(collections)))
        garbage = []
        garbage.append(garbage)  # a cycle: only a collection frees it
        return loop.StepResult(loss=2.0, grad_norm=0.5, skipped=False)

    def evaluate(model, make_batches, data, num_microbatches, args, plan):
        events.append(("eval", len(collections)))
        return {"lm loss": 1.5, "lm loss PPL": math.exp(1.5)}

    monkeypatch.setattr(loop, "train_step", train_step)
    monkeypatch.setattr(loop, "evaluate", evaluate)
    gc.callbacks.append(on_gc)
    try:
        loop.train(run, loop.TrainState())
    finally:
        gc.callbacks.remove(on_gc)
    steps = [e for e in events if e[0] == "step"]
    assert not any(enabled for _, _, enabled, _ in steps)  # the automatic collector is off
    assert gc.isenabled()  # and back on after the stage
    # one full collection at the start; one every `interval` steps; with --manual-gc-eval a
    # full one before the loop's evaluation at 4 and a young one after it (not around the
    # final evaluation, as in Megatron-LM)
    expected = [2]
    for iteration in range(1, 7):
        assert steps[iteration - 1][3] == len(expected)
        if iteration == 4 and around_eval:
            expected += [2, 0]
        if interval and iteration % interval == 0:
            expected.append(2)
    assert collections == expected


@pytest.mark.parametrize("flags_on", [True, False])
def test_tensorboard_scalars_follow_megatron_lms_flags_and_intervals(stand_ins, tmp_path,
                                                                      flags_on):
    """The loop with a real SummaryWriter; tensorboard is optional (not in the test extra)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = fake_run(6, eval_interval=4, log_interval=3)  # evaluations at 4 and 6
    run.args.__dict__.update(
        tensorboard_dir=str(tmp_path), tensorboard_log_interval=2, tensorboard_queue_size=5,
        log_loss_scale_to_tensorboard=flags_on, log_world_size_to_tensorboard=flags_on,
        log_memory_to_tensorboard=flags_on, log_timers_to_tensorboard=flags_on,
        log_validation_ppl_to_tensorboard=flags_on)
    run.tensorboard = metrics.TensorBoard(run.args, enabled=True)
    loop.train(run, loop.TrainState())
    run.tensorboard.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    written = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
               for tag in events.Tags()["scalars"]}

    def steps(tag):
        return [step for step, _ in written[tag]]

    # every --tensorboard-log-interval iterations, and against consumed samples (2 a step)
    for tag, value in [("learning-rate", 1e-3), ("batch-size", 2), ("lm loss", 2.0),
                       ("grad-norm", 0.5)]:
        assert written[tag] == [(i, pytest.approx(value)) for i in (2, 4, 6)]
        assert steps(f"{tag} vs samples") == [4, 8, 12]
    assert written["lm loss validation"] == [(4, 1.5), (6, 1.5)]
    assert steps("lm loss validation vs samples") == [8, 12]
    assert steps("tokens-per-second") == [3, 6]  # this project's, at --log-interval
    optional = {"loss-scale": [(i, 1.0) for i in (2, 4, 6)],
                "world-size": [(i, 1.0) for i in (2, 4, 6)],
                "lm loss validation ppl": [(4, pytest.approx(math.exp(1.5)))] * 1
                + [(6, pytest.approx(math.exp(1.5)))]}
    for tag, expected in optional.items():
        assert (written.get(tag) == expected) if flags_on else tag not in written
    for tag, at in [("iteration-time", [3, 6]), ("throughput", [3, 6]),
                    ("mem-max-rss-bytes", [2, 4, 6])]:
        assert (steps(tag) == at and all(v > 0 for _, v in written[tag])) if flags_on \
            else tag not in written


def test_wandb_gets_megatron_lms_scalars_against_the_iteration(stand_ins, tmp_path, monkeypatch,
                                                               capsys):
    """A real W&B run (offline without an API key); wandb is optional (not in the test extra)."""
    import glob

    pytest.importorskip("wandb")
    for variable in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(variable, raising=False)
    run, _ = fake_run(6, eval_interval=4, log_interval=3)  # evaluations at 4 and 6
    run.args.__dict__.update(
        tensorboard_dir=None, wandb_project="patch-megatron-test", wandb_exp_name="loop",
        wandb_save_dir=str(tmp_path), wandb_entity="", tensorboard_log_interval=2,
        tensorboard_queue_size=5, log_loss_scale_to_tensorboard=True,
        log_world_size_to_tensorboard=False, log_memory_to_tensorboard=False,
        log_timers_to_tensorboard=False, log_validation_ppl_to_tensorboard=False)
    run.tensorboard = metrics.TensorBoard(run.args, enabled=True)
    logged = []
    send = run.tensorboard.wandb.log
    monkeypatch.setattr(run.tensorboard.wandb, "log",
                        lambda data, step: (logged.append((step, data)), send(data, step=step)))
    loop.train(run, loop.TrainState())
    run.tensorboard.close()
    assert "written offline" in capsys.readouterr().out

    def at(name):
        return [(step, data[name]) for step, data in logged if name in data]

    for name, value in [("learning-rate", 1e-3), ("batch-size", 2), ("lm loss", 2.0),
                        ("grad-norm", 0.5), ("loss-scale", 1.0)]:
        assert at(name) == [(i, pytest.approx(value)) for i in (2, 4, 6)]
    assert at("lm loss validation") == [(4, 1.5), (6, 1.5)]
    assert not any(name.endswith("vs samples") for _, data in logged for name in data)
    (record,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert os.path.getsize(record) > 0  # the offline run wandb sync uploads


def test_train_lines_report_the_process_peak_memory_on_cpu(stand_ins):
    run, events = fake_run(2, eval_iters=0)
    loop.train(run, loop.TrainState())
    lines = training_lines("\n".join(line for kind, line in events if kind == "print"))
    assert sorted(lines) == [1, 2]
    for fields in lines.values():
        # The existing fields keep their order and format; the memory field comes last.
        names = list(fields)
        assert names[0] == "consumed samples" and fields["lm loss"] == "2.000000E+00"
        assert names[-2:] == ["number of nan iterations", "peak RSS of the process (MiB)"]
        assert fields["number of nan iterations"] == "0"
        rss = float(fields["peak RSS of the process (MiB)"])
        assert rss == pytest.approx(metrics.peak_rss_bytes() / 2**20, rel=0.05)


# ---------------------------------------------------------------------------
# --rampup-batch-size: each step's batch, from megatron-core's calculator.

RAMP = (4, 4, 40)  # batches of 4, then 8 from 20 consumed samples, then 12 from 40 on


def ramped_run(**options):
    from ramp_reference import step_batches

    expected = step_batches(*RAMP, 12, 100)
    run, events = fake_run(len(expected), global_batch_size=12, rampup=RAMP, micro_batch_size=2,
                           eval_iters=0, **options)
    return run, events, expected


def test_a_ramp_gives_each_step_its_batch_and_saves_when_it_grows(stand_ins, monkeypatch):
    # A microsecond per step: the logged throughput is then this step's tokens and FLOPs x 1e6.
    monkeypatch.setattr(metrics.IntervalMeter, "take", lambda self: (1e-6, 1))
    run, events, expected = ramped_run(save=True)
    loop.train(run, loop.TrainState())
    assert run.args.steps == [(i + 1, b // 2, b) for i, b in enumerate(expected)]  # mbs 2, DP 1
    lines = training_lines("\n".join(line for kind, line in events if kind == "print")).values()
    consumed = [sum(expected[:i + 1]) for i in range(len(expected))]
    assert [int(x["global batch size"]) for x in lines] == expected
    assert [int(x["consumed samples"]) for x in lines] == consumed
    tokens = [float(x["tokens per second"]) for x in lines]
    assert tokens == pytest.approx([8e6 * b for b in expected])  # T=8 tokens per sample
    tflops = [float(x["throughput per device (TFLOP/s)"]) for x in lines]
    per_sample = metrics.step_flops(run.plan, run.shape, global_batch_size=1) / 1e6
    assert per_sample > 0.01  # three printed decimals tell the batches apart
    assert tflops == pytest.approx([per_sample * b for b in expected], abs=1e-3)
    # As in Megatron-LM, a checkpoint before the first step of each larger batch (and the end).
    grown = [i for i in range(1, len(expected)) if expected[i] != expected[i - 1]]
    assert [it for kind, it in events if kind == "save"] == grown + [len(expected)]


def test_a_run_resumed_in_the_ramp_continues_it(stand_ins):
    run, events, expected = ramped_run(save=True)
    done = 6  # inside the batch-8 stretch: the checkpoint's consumed samples place the ramp
    loop.train(run, loop.TrainState(iteration=done, consumed_samples=sum(expected[:done])))
    assert [b for _, _, b in run.args.steps] == expected[done:]
    grown = [i for i in range(done + 1, len(expected)) if expected[i] != expected[i - 1]]
    assert [it for kind, it in events if kind == "save"] == grown + [len(expected)]


# ---------------------------------------------------------------------------
# metrics: what the memory and MFU fields measure.

def _proc_status_kib(field):
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        pytest.skip("needs Linux's /proc/self/status to compare with the kernel's own figures")


def test_peak_rss_is_the_kernels_high_water_mark_in_bytes():
    resident_before = _proc_status_kib("VmRSS") * 1024
    held = torch.ones(64 << 20, dtype=torch.float32)  # 256 MiB, written, so resident
    peak = metrics.peak_rss_bytes()
    assert peak >= resident_before + 0.9 * held.numel() * 4
    assert peak == pytest.approx(_proc_status_kib("VmHWM") * 1024, rel=0.02)
    del held


def test_gpu_peak_memory_is_the_allocators_max_allocated_and_reserved(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 5 * 2**30)
    assert metrics.peak_memory_mib(torch.device("cuda", 0)) == {
        "peak allocated GPU memory (MiB)": 3072.0, "peak reserved GPU memory (MiB)": 5120.0}
    assert list(metrics.peak_memory_mib(torch.device("cpu"))) == ["peak RSS of the process (MiB)"]


@pytest.mark.parametrize("device_name, precision, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0),  # SXM
    ("NVIDIA H200", "bf16", 989.0),  # H100's compute units, more memory
    ("NVIDIA H100 PCIe", "bf16", 756.0),  # not the SXM figure, though the name holds "H100"
    ("NVIDIA H100 NVL", "fp16", 835.0),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA L4", "bf16", None),  # unknown: no MFU rather than a wrong one
    ("NVIDIA H100 80GB HBM3", "fp32", None),  # fp32 matmuls cannot reach the bf16 peak
])
def test_mfu_peak_of_the_device(monkeypatch, device_name, precision, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    args = types.SimpleNamespace(peak_tflops=None, bf16=precision == "bf16", fp16=precision == "fp16")
    assert metrics.mfu_peak_tflops(args, on_cpu=False) == expected
    assert metrics.mfu_peak_tflops(args, on_cpu=True) is None
    args.peak_tflops = 500.0  # --peak-tflops always wins
    assert metrics.mfu_peak_tflops(args, on_cpu=False) == 500.0


# ---------------------------------------------------------------------------
# The real script, one process (the two-process layouts of tests/test_pretrain_patch_gpt.py run
# the same code with the cross-rank memory reduction).

def test_real_run_ends_with_a_validation_and_logs_peak_memory(tmp_path):
    import os
    import subprocess
    import sys

    from repo_tools import child_environment

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    flags = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 8 "
             "--micro-batch-size 2 --global-batch-size 4 --train-iters 6 --mock-data --vocab-size 128 "
             "--make-vocab-size-divisible-by 64 --untie-embeddings-and-output-weights --patch-size 4 "
             "--patch-data-fraction 0.667 --log-interval 2 --eval-interval 4 --eval-iters 1 --cpu "
             "--lr 3e-4").split() + list(RECIPE_FLAGS)
    losses = {}
    for workers in ("2", "0"):  # Megatron-LM's default of 2 reader processes, and none
        result = subprocess.run(
            [sys.executable, os.path.join(repo, "pretrain_patch_gpt.py"), *flags,
             "--num-workers", workers],
            capture_output=True, text=True, timeout=240, cwd=str(tmp_path),
            env=child_environment())
        assert result.returncode == 0, result.stderr[-3000:]
        evaluations = validation_lines(result.stdout)
        losses[workers] = ([fields["patch loss"] for fields in training_lines(result.stdout).values()]
                           + [v for _, _, values in evaluations for v in values.values()])
    # the same samples in the same order: the same training and validation losses, to the digit
    assert len(losses["2"]) == 3 + 2 * 3 and losses["2"] == losses["0"]
    assert [iteration for _, iteration, _ in evaluations] == [4, 6]
    assert evaluations[-1][0] == "patch" and list(evaluations[-1][2]) == [
        "patch loss", "token nll (K=1)", "token ppl (K=1)"]
    peaks = [float(fields["peak RSS of the process (MiB)"])
             for fields in training_lines(result.stdout).values()]
    assert len(peaks) == 3 and peaks == sorted(peaks) and peaks[0] > 100  # a running peak, MiB


def _model_with_grads(value):
    linear = torch.nn.Linear(2, 2)
    for p in linear.parameters():
        p.grad = torch.full_like(p, value)
    return linear


@pytest.mark.parametrize("grad, lr, problem", [
    (0.5, 1e-3, None),
    (float("nan"), 1e-3, "the gradients hold NaN/Inf"),
    (float("inf"), 1e-3, "the gradients hold NaN/Inf"),
    (0.5, float("inf"), "the learning rate is inf"),
    (0.5, float("nan"), "the learning rate is nan"),
])
def test_a_step_with_non_finite_gradients_or_learning_rate_is_named(grad, lr, problem):
    optimizer = types.SimpleNamespace(param_groups=[{"lr": lr}])
    assert loop.non_finite_step([_model_with_grads(grad)], optimizer) == problem


def test_a_run_ending_with_non_finite_weights_fails_and_does_not_save(stand_ins):
    run, events = fake_run(3, save_interval=2)
    with torch.no_grad():
        run.model[0].module.weight[0, 0] = float("nan")
    with pytest.raises(loop.NonFiniteLossError, match="iteration 3: the weights hold NaN/Inf at "
                       "the end of training \\(the last good checkpoint in ckpt stays latest\\)"):
        loop.train(run, loop.TrainState())
    assert [e for e in events if e[0] == "save"] == [("save", 2)]  # not the final one
