"""Flags: Megatron-LM names, the stage conventions, and every bad combination named with its fix."""

import pytest

from patch_megatron.llama_recipe import RECIPE_FLAGS
from patch_megatron.training.arguments import (
    ArgumentError, build_parser, check_world_size, num_microbatches, parse_args,
)

BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 16 "
        "--micro-batch-size 2 --mock-data --vocab-size 100 --cpu --lr 3e-4").split() + list(RECIPE_FLAGS)


def parse(*extra, base=BASE):
    return parse_args(list(base) + " ".join(extra).split())


def test_paper_defaults_and_megatron_names():
    args = parse("--global-batch-size 8 --train-iters 10")
    assert (args.lr, args.min_lr, args.lr_decay_style) == (3e-4, 0.0, "cosine")
    assert (args.adam_beta1, args.adam_beta2, args.adam_eps) == (0.9, 0.95, 1e-8)
    assert (args.weight_decay, args.clip_grad, args.seed) == (0.1, 1.0, 1234)
    assert args.max_position_embeddings == 16
    assert args.stage.name == "token" and args.stage.train_iters == 10


def test_patch_stage_and_token_stage_split_one_budget():
    # K=4, λ=2/3 of 3*2^16 tokens; patch stage B=2 samples of 64 tokens, token stage B=8 of 16.
    budget = 3 * 2 ** 16
    patch = parse(f"--patch-size 4 --patch-data-fraction 0.6666666667 --global-batch-size 2 "
                  f"--train-tokens {budget}").stage
    token = parse(f"--patch-size 1 --patch-data-fraction 0.6666666667 --global-batch-size 8 "
                  f"--train-tokens {budget}").stage
    assert patch.name == "patch" and patch.tokens_per_sample == 64 and patch.seq_length == 16
    assert patch.tokens_per_step == token.tokens_per_step == 128  # equal tokens per step
    assert patch.train_iters == 1024 and token.train_iters == 512
    assert patch.data_start_token == 0
    assert token.data_start_token == round(budget * 0.6666666667) >= patch.train_tokens
    assert token.data_start_token + token.train_tokens <= budget
    assert patch.loss_name == "patch loss" and token.loss_name == "lm loss"


def test_token_stage_start_from_its_own_length():
    token = parse("--patch-size 1 --patch-data-fraction 0.5 --global-batch-size 4 --train-iters 10").stage
    assert token.data_start_token == token.train_tokens == 10 * 4 * 16


def test_warmup_fraction_and_world_size():
    args = parse("--train-iters 100 --lr-warmup-fraction 0.1")
    assert check_world_size(args, world_size=4) == 4
    assert args.global_batch_size == 8 and args.stage.lr_warmup_iters == 10
    assert num_microbatches(args, 4) == 1
    args = parse("--global-batch-size 8 --train-iters 5 --tensor-model-parallel-size 2")
    assert check_world_size(args, world_size=2) == 1 and num_microbatches(args, 1) == 4


def test_help_is_grouped():
    text = build_parser().format_help()
    for title in ("model (Megatron-LM", "patch-level training", "batch and length", "optimizer",
                  "precision", "parallelism", "data", "checkpoints", "logging", "exit"):
        assert title in text


BAD = [
    ("--train-iters 5 --no-such-flag", "unrecognized arguments"),
    ("--train-iters 5 --bf16 --fp16", "pick one"),
    ("--global-batch-size 8", "exactly one of --train-iters"),
    ("--train-iters 5 --train-samples 40", "exactly one of --train-iters"),
    ("--train-iters 5 --patch-size 4", "--patch-data-fraction λ"),
    ("--train-iters 5 --patch-data-fraction 1.0", "leaves it no data"),
    ("--train-iters 5 --patch-data-fraction 1.5", "must lie in [0, 1]"),
    ("--train-iters 5 --patch-size 0", "--patch-size must be >= 1"),
    ("--train-iters 5 --global-batch-size 7", "not a multiple of --micro-batch-size 2"),
    ("--train-samples 4 --global-batch-size 8", "less than one global batch"),
    ("--train-tokens 100 --global-batch-size 8", "no full step"),
    ("--train-iters 5 --num-query-groups 2", "needs --group-query-attention"),
    ("--train-iters 5 --group-query-attention", "needs --num-query-groups"),
    ("--train-iters 5 --group-query-attention --num-query-groups 3", "must divide"),
    ("--train-iters 5 --tensor-model-parallel-size 3", "not divisible by --tensor-model-parallel-size"),
    ("--train-iters 5 --pipeline-model-parallel-size 4 --num-layers 2", "split evenly"),
    ("--train-iters 5 --pipeline-model-parallel-size 3 --num-layers 5 "
     "--decoder-first-pipeline-num-layers 2", "leaves 3 of them for the 2 other pipeline stages"),
    ("--train-iters 5 --pipeline-model-parallel-size 2 --num-layers 3 "
     "--decoder-first-pipeline-num-layers 1 --decoder-last-pipeline-num-layers 1",
     "leaves 1 of them for the 0 other"),
    ("--train-iters 5 --num-layers 3 --decoder-last-pipeline-num-layers 1",
     "need --pipeline-model-parallel-size > 1"),
    ("--train-iters 5 --pipeline-model-parallel-size 2 --decoder-first-pipeline-num-layers 0",
     "must be >= 1"),
    ("--train-iters 5 --swiglu --squared-relu", "pick one"),
    ("--train-iters 5 --num-layers 4 --pipeline-model-parallel-size 2 "
     "--num-layers-per-virtual-pipeline-stage 1 --num-virtual-stages-per-pipeline-rank 2",
     "give one of"),
    ("--train-iters 5 --num-layers 6 --pipeline-model-parallel-size 2 "
     "--num-layers-per-virtual-pipeline-stage 2", "must divide the 3 layers"),
    ("--train-iters 5 --num-layers 4 --pipeline-model-parallel-size 2 "
     "--num-layers-per-virtual-pipeline-stage 1 --no-overlap-p2p-communication",
     "--pipeline-model-parallel-size > 2"),
    ("--train-iters 5 --num-layers 6 --pipeline-model-parallel-size 2 "
     "--num-virtual-stages-per-pipeline-rank 2 --decoder-first-pipeline-num-layers 1",
     "the first stage holds 1"),
    ("--train-iters 5 --microbatch-group-size-per-virtual-pipeline-stage 2",
     "tune the interleaved schedule"),
    ("--train-iters 5 --position-embedding-type relative", "invalid choice"),
    ("--train-iters 5 --position-embedding-type learned_absolute --no-position-embedding",
     "--position-embedding-type none"),
    ("--train-iters 5 --max-position-embeddings 8", "below --seq-length"),
    ("--train-iters 5 --hidden-dropout 1.5", "[0, 1)"),
    ("--train-iters 5 --normalization ScaleNorm", "invalid choice"),
    ("--train-iters 5 --global-batch-size 8 --lr-warmup-iters 5", "does not fit"),
    ("--train-iters 5 --lr-warmup-iters 2 --lr-warmup-fraction 0.1", "keep one"),
    ("--train-iters 5 --min-lr 1.0", "--min-lr <= --lr"),
    ("--train-iters 5 --save-interval 2", "needs --save"),
    ("--train-iters 5 --save s --save-interval 2 --save-retain-interval 3",
     "positive multiple of --save-interval (2)"),
    ("--train-iters 5 --save s --save-retain-interval 2", "positive multiple of --save-interval"),
    ("--train-iters 5 --exit-signal-handler", "needs --save"),
    ("--train-iters 5 --finetune", "needs --load"),
    ("--train-iters 5 --split 100,0,0", "validation part"),
    ("--train-iters 5 --split abc", "validation part"),
    ("--train-iters 5 --ckpt-format torch_dcp", "only with its FSDP implementations"),
]


@pytest.mark.parametrize("flags, fix", BAD, ids=[b[0] for b in BAD])
def test_bad_flags_are_named(flags, fix):
    with pytest.raises(ArgumentError) as error:
        parse(flags)
    assert fix in str(error.value)


def test_bad_data_sources():
    base = [a for a in BASE if a not in ("--mock-data",)]
    with pytest.raises(ArgumentError, match="exactly one data source"):
        parse("--train-iters 5", base=base)
    with pytest.raises(ArgumentError, match="needs --tokenizer-type"):
        parse("--train-iters 5 --data-path corpus_text_document", base=base)
    with pytest.raises(ArgumentError, match="weight before each prefix"):
        parse("--train-iters 5 --data-path a b c --tokenizer-type NullTokenizer --vocab-size 9",
              base=base)
    with pytest.raises(ArgumentError, match="needs --vocab-size"):
        parse("--train-iters 5", base=[a for a in BASE if a not in ("--vocab-size", "100")])


def test_world_size_checks():
    args = parse("--train-iters 5 --tensor-model-parallel-size 2")
    with pytest.raises(ArgumentError, match="launch a multiple of 2"):
        check_world_size(args, world_size=3)
    args = parse("--train-iters 5 --global-batch-size 6")
    with pytest.raises(ArgumentError, match="micro-batch-size x data-parallel size"):
        check_world_size(args, world_size=2)
    # The interleaved schedule's micro-batch groups: PP 2 needs at least 2 per step.
    interleaved = ("--train-iters 5 --num-layers 4 --pipeline-model-parallel-size 2 "
                   "--num-layers-per-virtual-pipeline-stage 1 --global-batch-size {}")
    with pytest.raises(ArgumentError, match="runs a step of 1 micro-batches per data-parallel"):
        check_world_size(parse(interleaved.format(2)), world_size=2)
    assert check_world_size(parse(interleaved.format(4)), world_size=2) == 1


def test_transformer_impl_is_checked_on_the_machine_that_runs_it():
    from patch_megatron.model.spec import have_transformer_engine

    assert parse("--train-iters 5").transformer_impl is None  # TE if installed, else local
    args = parse("--train-iters 5 --transformer-impl transformer_engine")  # parses anywhere
    if have_transformer_engine():
        assert check_world_size(args, world_size=1) == 1
    else:
        with pytest.raises(ArgumentError, match="not installed here.*--transformer-impl local"):
            check_world_size(args, world_size=1)
    assert check_world_size(parse("--train-iters 5 --transformer-impl local"), world_size=1) == 1
    with pytest.raises(ArgumentError, match="--est builds its layers on megatron-core's local"):
        parse("--train-iters 5 --est --transformer-impl transformer_engine")
    with pytest.raises(ArgumentError, match="--est drops the same number of layers on every"):
        parse("--train-iters 5 --est --swiglu --disable-bias-linear --num-layers 3 "
              "--pipeline-model-parallel-size 2 --decoder-first-pipeline-num-layers 1")


def test_parsing_and_checking_flags_does_not_load_megatron():
    # Megatron-core takes seconds to import; bad flags must fail fast, and parsing a GPU
    # command elsewhere (the two-stage runner's plan) must not need it. A batch ramp's steps
    # are counted by megatron-core's calculator in check_world_size, after parsing.
    import subprocess
    import sys

    ramp = "--global-batch-size 8 --train-samples 80 --rampup-batch-size 2 2 20"
    code = ("import sys; from patch_megatron.training.arguments import parse_args, check_world_size; "
            f"args = parse_args({' '.join(BASE)!r}.split() + '--train-iters 5 --est'.split()); "
            "check_world_size(args, world_size=1); "
            f"parse_args({' '.join(BASE)!r}.split() + {ramp!r}.split()); "
            "print(sorted(m for m in sys.modules if m.startswith('megatron')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("flags", ["--lr inf", "--lr nan", "--min-lr nan"])
def test_a_non_finite_learning_rate_is_refused(flags):
    with pytest.raises(ArgumentError, match="--lr and --min-lr must be finite numbers"):
        parse("--global-batch-size 8 --train-iters 10", flags)


def test_overwrite_save_is_off_unless_asked_for():
    assert parse("--global-batch-size 8 --train-iters 10").overwrite_save is False
    assert parse("--global-batch-size 8 --train-iters 10 --overwrite-save").overwrite_save is True


def test_sequence_parallel_without_tensor_parallelism_is_turned_off_with_a_warning():
    # Megatron-LM warns and turns it off rather than failing.
    with pytest.warns(UserWarning, match="--sequence-parallel is turned off"):
        args = parse("--train-iters 5 --sequence-parallel")
    assert args.sequence_parallel is False


def test_a_missing_learning_rate_is_named():
    base = [flag for flag in BASE if flag not in ("--lr", "3e-4")]
    with pytest.raises(ArgumentError, match="--lr"):
        parse("--train-iters 5", base=base)


@pytest.mark.parametrize("flags, message", [
    ("--wandb-project p", "--wandb-project needs --wandb-exp-name"),
    ("--wandb-project p --wandb-exp-name run", "give --save or --wandb-save-dir"),
])
def test_wandb_flags_are_checked_as_in_megatron_lm(flags, message):
    with pytest.raises(ArgumentError, match=message):
        parse("--global-batch-size 8 --train-iters 10", flags)


def test_wandb_without_the_package_is_refused_before_training(monkeypatch):
    import importlib.util

    args = parse("--global-batch-size 8 --train-iters 10 --wandb-project p --wandb-exp-name run "
                 "--save ckpt")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ArgumentError, match="Weights & Biases is not installed here; pip install wandb"):
        check_world_size(args, world_size=1)


def test_rerun_engine_flags_take_megatron_lms_defaults_and_bad_ones_are_named(tmp_path):
    args = parse("--train-iters 5")
    assert (args.rerun_mode, args.error_injection_rate, args.error_injection_type) == (
        "validate_results", 0, "transient_error")
    assert not args.check_for_spiky_loss and not args.check_for_large_grads
    for flags, message in [
            ("--rerun-mode report_stats", "megatron-core 0.16.1's rerun state machine cannot"),
            ("--error-injection-rate -1", "--error-injection-rate -1: give 0"),
            (f"--result-rejected-tracker-filename {tmp_path}", "not a file this run can append"),
            (f"--result-rejected-tracker-filename {tmp_path}/absent/log.txt", "name a writable")]:
        with pytest.raises(ArgumentError, match=message):
            parse("--train-iters 5", flags)
    assert parse("--train-iters 5", f"--result-rejected-tracker-filename {tmp_path}/log.txt")


REAL_DATA = [f for f in BASE if f != "--mock-data"] + ["--data-path", "corpus", "--tokenizer-type",
                                                     "GPTSentencePieceTokenizer",
                                                     "--tokenizer-model", "sp.model"]


@pytest.mark.parametrize("flags, base, message", [
    ("--fim-data", BASE, "--mock-data has none"),
    ("--fim-data --fim-rate 1.5", REAL_DATA, "--fim-rate 1.5 is a probability"),
    ("--fim-data --fim-split-sample |", REAL_DATA, "--fim-fragment-rate: give it"),
    ("--fim-data --tokenizer-type NullTokenizer", REAL_DATA, "NullTokenizer's ids have no text"),
])
def test_fim_flags_are_checked_before_training(flags, base, message):
    with pytest.raises(ArgumentError, match=message):
        parse("--train-iters 5", flags, base=base)
    assert parse("--train-iters 5 --fim-data --fim-split-sample | --fim-fragment-rate 0.5",
                 base=REAL_DATA).fim_data
