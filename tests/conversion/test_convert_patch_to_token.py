"""tools/convert_patch_to_token.py: the token stage starts from the patch stage's weights only.

Uses the session's real two-stage run: patch stage (K=4, TP=2, 3 iterations)
-> converter (target TP=1, PP=2: vocabulary re-padded) -> token stage (PP=2).
"""

import os
import shutil

import pytest
import torch

from two_stage import (PATCH_FLAGS, SHAPE_FLAGS, TOKEN_FLAGS, our_model, run_tool, run_training,
                       train_lines)


def _record(directory):
    from patch_megatron.conversion.megatron_checkpoint import open_checkpoint

    return open_checkpoint(directory).record


def _common(directory):
    from patch_megatron.conversion.megatron_checkpoint import open_checkpoint
    from patch_megatron.training import safe_load

    return safe_load.read_common(open_checkpoint(directory).path)


def _stage(flags, vocab_size, world_size):
    """The token/patch stage's plan and datasets as pretrain_patch_gpt.py builds them."""
    from patch_megatron.training.arguments import check_world_size, parse_args
    from patch_megatron.training.data import build_stage_data

    args = parse_args([*SHAPE_FLAGS, *flags, "--vocab-size", str(vocab_size)])
    dp = check_world_size(args, world_size)
    return args.stage, build_stage_data(args, args.stage, dp)


def test_handoff_checkpoint_holds_weights_only(two_stage_run, world_of_one, vocab_size):
    record = _record(two_stage_run["handoff"])
    assert record.iteration == 0 and record.consumed_train_samples == 0
    assert record.patch_size == 1 and record.weights_only is True
    assert record.optimizer_format is None and record.scheduler is None and not record.has_rng
    assert not {"optimizer", "opt_param_scheduler", "rng_state"} & _common(two_stage_run["handoff"]).keys()
    assert record.layout == (1, 2)
    patch_record = _record(two_stage_run["patch"])
    position = record.data_position
    assert position["consumed_samples"] == patch_record.consumed_train_samples == 3 * 4
    assert position["consumed_tokens"] == 12 * 4 * 8

    # The same weights; only the padding rows of the vocabulary changed (TP=2 pads to 128s, TP=1 to 64s).
    from patch_megatron.conversion.megatron_checkpoint import load_full_weights, open_checkpoint

    patch = load_full_weights(open_checkpoint(two_stage_run["patch"]))
    handoff = load_full_weights(open_checkpoint(two_stage_run["handoff"]))
    assert patch.keys() == handoff.keys()
    for name, tensor in patch.items():
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            assert tensor.shape[0] != handoff[name].shape[0]
            tensor, other = tensor[:vocab_size], handoff[name][:vocab_size]
        else:
            other = handoff[name]
        assert torch.equal(tensor, other), name


def test_token_stage_starts_fresh_from_patch_weights_on_disjoint_data(two_stage_run, world_of_one,
                                                                      vocab_size):
    token_plan, token_data = _stage(TOKEN_FLAGS, vocab_size, 2)
    patch_plan, patch_data = _stage(PATCH_FLAGS, vocab_size, 2)
    lines = train_lines(two_stage_run["token_log"])
    consumed, lr, logged_loss = lines[1]
    # A fresh iteration counter and data position, and the token stage's own schedule at step 0
    # (the patch stage's schedule ended at lr 0 and had max lr 1e-3).
    assert consumed == token_plan.global_batch_size
    assert lr == pytest.approx(5e-4)

    # Its first loss is the patch stage's weights (K=1) on the token stage's first global batch.
    model, _ = our_model(two_stage_run["handoff"])
    batch = [token_data.train[i] for i in range(token_plan.global_batch_size)]
    tokens = torch.stack([s["tokens"] for s in batch])
    labels = torch.stack([s["labels"] for s in batch])
    with torch.no_grad():
        expected = model(tokens, labels=labels).mean().item()
    assert logged_loss == pytest.approx(expected, rel=1e-5)

    # Disjoint data: the token stage begins past everything the patch stage read.
    position = _record(two_stage_run["handoff"]).data_position
    assert token_plan.data_start_token >= position["consumed_tokens"]
    read_by_patch = [patch_data.train[i]["tokens"] for i in range(position["consumed_samples"])]
    for sample in batch:
        assert not any(torch.equal(sample["tokens"], seen[:len(sample["tokens"])]) for seen in read_by_patch)

    # Its own checkpoint counts only its own steps: optimizer and schedule started at 0.
    record = _record(two_stage_run["token"])
    assert record.iteration == 2 and record.consumed_train_samples == 2 * 8
    assert record.scheduler["num_steps"] == 2 * 8  # samples, as Megatron-LM counts them
    assert _common(two_stage_run["token"])["optimizer"]["state"]["common_step"] == 2


def test_refusals(two_stage_run, tmp_path):
    code, err = run_tool("convert_patch_to_token", ["--load", two_stage_run["handoff"],
                                                    "--save", str(tmp_path / "a")])
    assert code == 2 and "already token-level" in err and "--force" in err

    # An interrupted save: an iter_*.incomplete directory and no latest file.
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copytree(os.path.join(two_stage_run["patch"], "iter_0000003"),
                    partial / "iter_0000003.incomplete")
    code, err = run_tool("convert_patch_to_token", ["--load", str(partial), "--save", str(tmp_path / "b")])
    assert code == 2 and "interrupted" in err
    code, err = run_tool("convert_patch_to_token", ["--load", str(partial), "--iteration", "3",
                                                    "--save", str(tmp_path / "b")])
    assert code == 2 and "interrupted" in err

    # A complete-looking directory with a shard file missing.
    damaged = tmp_path / "damaged"
    shutil.copytree(two_stage_run["patch"], damaged)
    shard = next(f for f in os.listdir(damaged / "iter_0000003") if f.endswith(".distcp"))
    os.remove(damaged / "iter_0000003" / shard)
    code, err = run_tool("convert_patch_to_token", ["--load", str(damaged), "--save", str(tmp_path / "c")])
    assert code == 2 and f"iter_0000003/{shard} (missing)" in err  # named by the checksums

    # A layout the model cannot take (4 heads over TP=3).
    code, err = run_tool("convert_patch_to_token", ["--load", two_stage_run["patch"], "--save",
                                                    str(tmp_path / "d"),
                                                    "--target-tensor-parallel-size", "3"])
    assert code == 2 and "TP=3" in err
    assert sorted(os.listdir(tmp_path)) == ["damaged", "partial"]  # nothing half-written


def test_force_rewrites_a_token_level_checkpoint(two_stage_run, tmp_path):
    target = tmp_path / "again"
    target.mkdir()
    (target / "old.txt").write_text("old")
    code, err = run_tool("convert_patch_to_token", ["--load", two_stage_run["token"], "--save",
                                                    str(target), "--force"])
    assert code == 0, err
    assert sorted(os.listdir(target)) == ["iter_0000000", "latest_checkpointed_iteration.txt"]


def test_plain_load_starts_the_token_stage(two_stage_run, vocab_size, tmp_path):
    """``pretrain_patch_gpt.py --load`` alone (no --finetune) takes the weights-only checkpoint."""
    log = run_training([*TOKEN_FLAGS, "--vocab-size", str(vocab_size), "--exit-interval", "1",
                        "--load", two_stage_run["handoff"]], nproc=1)
    consumed, lr, _ = train_lines(log)[1]
    assert consumed == 8 and lr == pytest.approx(5e-4)


def test_the_target_layout_is_checked_with_the_runs_own_stage_split(two_stage_run, tmp_path):
    """2 layers over 3 pipeline stages split only with the embedding counted as a layer
    (--account-for-embedding-in-pipeline-split): the handoff takes the patch run's flag."""
    from patch_megatron.training import safe_load

    def convert(name):
        return run_tool("convert_patch_to_token", ["--load", str(tmp_path / name), "--save",
                                                   str(tmp_path / f"{name}_out"),
                                                   "--target-pipeline-parallel-size", "3"])

    for name, counted in (("even", False), ("counted", True)):
        shutil.copytree(two_stage_run["patch"], tmp_path / name)
        path = str(tmp_path / name / "iter_0000003")
        common = safe_load.read_common(path)
        common["args"].account_for_embedding_in_pipeline_split = counted
        torch.save(common, os.path.join(path, safe_load.COMMON_FILE))
        safe_load.write_checksums(path)
    code, err = convert("even")
    assert code == 2 and "cannot be laid out at TP=2, PP=3" in err and "split evenly" in err
    code, err = convert("counted")
    assert code == 0, err
