"""The log reader parses exactly the lines the training loop writes."""

import pytest

from patch_megatron.training.arguments import StagePlan
from patch_megatron.training.log_reading import tokens_per_second, validation_curve
from patch_megatron.training.metrics import eval_line, train_line


def plan(name, K):
    return StagePlan(name=name, patch_size=K, seq_length=8, global_batch_size=2, train_iters=10,
                     lr_warmup_samples=2, lr_decay_samples=20, data_start_token=0)


def training(stage, iteration, rate):
    return train_line(stage, iteration, iteration * 2, 1e-3, 5.0, 1.0, 0.1, rate, 0.01, None, 0, 0,
                      memory_mib={"peak RSS of the process (MiB)": 900.0})


def test_patch_stage_reports_its_token_nll_and_token_stage_its_lm_loss():
    patch, token = plan("patch", 4), plan("token", 1)
    log = "\n".join([
        training(patch, 5, 1000.0),
        eval_line(patch, 5, {"patch loss": 6.5, "token nll (K=1)": 6.25, "token ppl (K=1)": 518.0}),
        eval_line(token, 10, {"lm loss": 4.125, "lm loss PPL": 61.9}),
        "validation of something else | lm loss value: 1.0",
    ])
    assert validation_curve(log) == [(5, 6.25), (10, 4.125)]


def test_tokens_per_second_skips_the_warm_up_interval():
    stage = plan("token", 1)
    log = "\n".join(training(stage, i, r) for i, r in [(2, 10.0), (4, 300.0), (6, 500.0)])
    assert tokens_per_second(log) == pytest.approx(400.0)
    assert tokens_per_second(training(stage, 2, 10.0)) == pytest.approx(10.0)  # only one: kept
    assert tokens_per_second("no training lines") != tokens_per_second("no training lines")  # NaN


def test_training_lines_keep_every_field_as_printed():
    from patch_megatron.training.log_reading import losses, training_lines

    log = ("[2026-12-02 04:46:56] iteration      280/     651 | consumed samples:         1120 | "
           "learning rate: 1.000000E-03 | patch loss: 6.367303E+00 | MFU: 41.2% |\n"
           " validation patch stage at iteration 280 | patch loss value: 6.3E+00 |\n"
           "[2026-12-02 04:46:58] iteration      300/     651 | consumed samples:         1200 | "
           "lm loss: 5.000000E+00 | peak RSS of the process (MiB): 512.1 |\n")
    lines = training_lines(log)
    assert sorted(lines) == [280, 300]
    assert lines[280] == {"consumed samples": "1120", "learning rate": "1.000000E-03",
                          "patch loss": "6.367303E+00", "MFU": "41.2%"}
    assert lines[300]["peak RSS of the process (MiB)"] == "512.1"
    assert losses(log) == {280: "6.367303E+00", 300: "5.000000E+00"}


def test_training_lines_read_the_loops_own_line():
    from patch_megatron.training.log_reading import losses, training_lines

    line = training(plan("patch", 4), 3, 1234.5)
    fields = training_lines(line)[3]
    assert fields["tokens per second"] == "1234.5"
    assert fields["peak RSS of the process (MiB)"] == "900.0"
    assert float(losses(line)[3]) == 5.0
