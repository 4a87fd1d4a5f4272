"""checkpoint_record: one record for our checkpoints of both schemas and for Megatron-LM's.

Megatron-LM's side is its own output: the fixtures of tests/fixtures/megatron_lm
(written by Megatron-LM core_v0.16.1's save_checkpoint, see make_fixtures.py
there). Our first schema is pinned by tests/fixtures/patch_megatron_v1.
"""

import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from patch_megatron.llama_recipe import ARCHITECTURE_FLAGS
from patch_megatron.training import safe_load
from patch_megatron.training.checkpoint_record import (
    SCHEMA_VERSION,
    CheckpointRecord,
    read_record,
    shape_record,
    to_common,
)
from repo_tools import IN_PROCESS_READING, REPO_ROOT, child_environment

FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures")
MLM = os.path.join(FIXTURES, "megatron_lm")
V1 = os.path.join(FIXTURES, "patch_megatron_v1")

# The fixtures' Megatron-LM flags (make_fixtures.py), as pretrain_patch_gpt.py takes them:
# NullTokenizer --vocab-size 128 has 129 ids (EOD last), which --mock-data --vocab-size 129 matches.
MLM_FLAGS = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--seq-length", "16", "--max-position-embeddings", "16", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--mock-data", "--vocab-size", "129",
    "--make-vocab-size-divisible-by", "64", "--normalization", "RMSNorm", "--swiglu",
    "--position-embedding-type", "rope", "--disable-bias-linear",
    "--untie-embeddings-and-output-weights", "--ffn-hidden-size", "64",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
    "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", "1234",
    "--cpu", "--eval-iters", "0", "--log-interval", "1", *IN_PROCESS_READING,
]


def record_of(directory):
    path = os.path.join(directory, f"iter_{int(open(os.path.join(directory, 'latest_checkpointed_iteration.txt')).read()):07d}")
    return read_record(safe_load.read_common(path), path)


def pretrain(*flags):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "pretrain_patch_gpt.py"), *flags],
                          cwd=REPO_ROOT, env=child_environment(), capture_output=True, text=True,
                          timeout=600)


def test_reads_megatron_lm_checkpoints():
    for name, optimizer_format in (("llama_plain", "local"), ("llama_distopt", "dp_reshardable")):
        record = record_of(os.path.join(MLM, name))
        assert record.source == "megatron-lm" and record.patch_size == 1
        assert record.iteration == 2 and record.consumed_train_samples == 8
        assert shape_record(record.model_shape) == {
            "num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
            "num_query_groups": 4, "vocab_size": 192, "untie_embeddings_and_output_weights": True,
            "kv_channels": 8, "normalization": "RMSNorm", "apply_layernorm_1p": False,
            "activation": "swiglu", "add_bias_linear": False, "add_qkv_bias": False,
            "position_embedding_type": "rope", "rotary_percent": 1.0,
            "rotary_interleaved": False, "qk_layernorm": False}
        assert record.optimizer_format == optimizer_format and record.has_rng
        assert record.scheduler["num_steps"] == 8  # samples, Megatron-LM's unit


def test_reads_the_first_schema_with_its_scheduler_in_samples():
    record = record_of(os.path.join(V1, "patch_stage"))
    assert record.schema_version == 1 and record.patch_size == 4 and record.stage == "patch"
    assert record.iteration == 2 and record.consumed_train_samples == 8
    assert record.model_shape.ffn_hidden_size == 64 and record.layout == (1, 1)
    # the first schema predates the architecture keys: its models were LLaMA's
    assert record.model_shape.normalization == "RMSNorm"
    assert record.model_shape.activation == "swiglu" and record.model_shape.kv_channels == 8
    assert not record.model_shape.qk_layernorm and not record.model_shape.rotary_interleaved
    raw = safe_load.read_common(os.path.join(V1, "patch_stage", "iter_0000002"))
    assert raw["opt_param_scheduler"]["num_steps"] == 2  # iterations, as schema 1 counted
    assert record.scheduler["num_steps"] == 2 * 4 and record.scheduler["lr_warmup_steps"] == 1 * 4
    assert not record.has_rng  # schema 1's tensor RNG states are not read back
    handoff = record_of(os.path.join(V1, "token_init"))
    assert handoff.weights_only and handoff.optimizer_format is None
    assert handoff.data_position["consumed_samples"] == 8


def test_schema_2_round_trip():
    record = CheckpointRecord(
        iteration=7, patch_size=4, tensor_model_parallel_size=2, pipeline_model_parallel_size=1,
        model_shape={"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64,
                     "num_attention_heads": 4, "num_query_groups": 2, "vocab_size": 256,
                     "untie_embeddings_and_output_weights": False, "kv_channels": 8,
                     "normalization": "LayerNorm", "apply_layernorm_1p": True,
                     "activation": "gelu", "add_bias_linear": True, "add_qkv_bias": True,
                     "position_embedding_type": "learned_absolute", "rotary_percent": 1.0,
                     "rotary_interleaved": True, "qk_layernorm": True},
        flags={"seq_length": 16, "global_batch_size": 8, "bf16": True, "data_parallel_size": 2},
        consumed_train_samples=56, skipped_iters=1, nan_iters=1, optimizer_format="dp_reshardable",
        scheduler={"num_steps": 56, "lr_warmup_steps": 8}, flops_so_far=1.5e9)
    common = to_common(record)
    assert common["args"].consumed_train_samples == 56 and common["args"].padded_vocab_size == 256
    assert common["args"].world_size == 4 and common["args"].use_distributed_optimizer
    assert common["args"].qk_layernorm and common["args"].rotary_interleaved  # Megatron-LM's names
    back = read_record(common, "x")
    assert back.flags.items() >= record.flags.items()  # plus Megatron-LM's bookkeeping
    assert replace(back, flags=record.flags) == record and back.params_dtype == torch.bfloat16
    newer = {**common, "patch_megatron": {**common["patch_megatron"],
                                          "schema_version": SCHEMA_VERSION + 1}}
    with pytest.raises(ValueError, match="newer patch-megatron"):
        read_record(newer, "x")
    with pytest.raises(ValueError, match="neither this project's checkpoint record"):
        read_record({"iteration": 3}, "x")


def test_megatron_lm_args_with_qk_layernorm_and_interleaved_rope():
    common = safe_load.read_common(os.path.join(MLM, "llama_plain", "iter_0000002"))
    common["args"].qk_layernorm = common["args"].rotary_interleaved = True
    shape = read_record(common, "x").model_shape
    assert shape.qk_layernorm and shape.rotary_interleaved


def test_a_qk_layernorm_model_is_rebuilt_from_its_record():
    """Saved, read back and described for a converter: the same model, its norms included."""
    from types import SimpleNamespace

    from patch_megatron.conversion.model_description import from_record
    from patch_megatron.model.config import PatchGPTConfig
    from patch_megatron.model.patch_gpt import build_model
    from patch_megatron.parallel import initialize_world_of_one
    from patch_megatron.training.checkpointing import model_shape_of

    initialize_world_of_one(1234)
    config = PatchGPTConfig(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=64,
                            seq_length=8, position_embedding_type="rope", qk_layernorm=True,
                            rotary_interleaved=True)
    model = build_model(config)
    record = CheckpointRecord(iteration=1, patch_size=1, tensor_model_parallel_size=1,
                              pipeline_model_parallel_size=1, flags={"seq_length": 8},
                              model_shape=model_shape_of([SimpleNamespace(module=model)]))
    rebuilt_config = from_record(read_record(to_common(record), "x"), "x").model_config()
    assert rebuilt_config.qk_layernorm and rebuilt_config.rotary_interleaved
    rebuilt = build_model(rebuilt_config)
    shapes = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()
            if not k.endswith("_extra_state")} == shapes
    assert "decoder.layers.0.self_attention.k_layernorm.bias" in shapes


# Megatron-LM's fixtures of one LLaMA run and the flags that say how it was saved.
MLM_CHECKPOINTS = {"llama_plain": [], "llama_distopt": ["--use-distributed-optimizer"],
                   "llama_torch": ["--ckpt-format", "torch"],
                   "llama_distopt_torch": ["--use-distributed-optimizer", "--ckpt-format", "torch"]}
LEGACY_AND_DIST = [("llama_torch", "llama_plain"), ("llama_distopt_torch", "llama_distopt")]


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Our checkpoints of the fixtures' run, plain and distributed optimizer, in both formats."""
    out = {}
    for name, extra in MLM_CHECKPOINTS.items():
        save = str(tmp_path_factory.mktemp(name) / "save")
        result = pretrain(*MLM_FLAGS, *extra, "--train-iters", "2", "--save", save,
                          "--save-interval", "2")
        assert result.returncode == 0, result.stderr[-3000:]
        out[name] = os.path.join(save, "iter_0000002")
    return out


@pytest.mark.parametrize("name", ["llama_plain", "llama_distopt"])
def test_our_checkpoint_has_every_entry_megatron_lm_asks_for(ours, name):
    """Megatron-LM's load_checkpoint requests the keys its own save writes, at default
    strictness missing ones are errors; its check_checkpoint_args and scheduler read args."""
    from torch.distributed.checkpoint import FileSystemReader

    theirs_dir = os.path.join(MLM, name, "iter_0000002")
    theirs_keys = set(FileSystemReader(theirs_dir).read_metadata().state_dict_metadata)
    our_keys = set(FileSystemReader(ours[name]).read_metadata().state_dict_metadata)
    assert theirs_keys <= our_keys, sorted(theirs_keys - our_keys)
    theirs, mine = safe_load.read_common(theirs_dir), safe_load.read_common(ours[name])
    assert set(theirs) <= set(mine), set(theirs) - set(mine)
    assert mine["content_metadata"] == theirs["content_metadata"]
    assert mine["checkpoint_version"] == theirs["checkpoint_version"] == 3.0
    for attribute in ("num_layers", "hidden_size", "num_attention_heads", "add_position_embedding",
                      "max_position_embeddings", "make_vocab_size_divisible_by",
                      "padded_vocab_size", "tensor_model_parallel_size",
                      "pipeline_model_parallel_size", "consumed_train_samples",
                      "use_distributed_optimizer", "ffn_hidden_size",
                      "untie_embeddings_and_output_weights"):
        assert getattr(mine["args"], attribute) == getattr(theirs["args"], attribute), attribute
    # The same flags, the same schedule, counted in samples: Megatron-LM's loader asserts it.
    assert mine["opt_param_scheduler"] == theirs["opt_param_scheduler"]


@pytest.mark.parametrize("legacy, dist", LEGACY_AND_DIST)
def test_our_legacy_format_holds_what_megatron_lms_does(ours, legacy, dist):
    """--ckpt-format torch: the rank file's entries, model keys and shapes, optimizer state
    layout and (distributed optimizer) distrib_optim.pt are Megatron-LM's."""
    def rank_files(iteration_dir):
        folder = os.path.join(iteration_dir, "mp_rank_00")
        return {n: safe_load.read_state_file(os.path.join(folder, n)) for n in os.listdir(folder)}

    theirs = rank_files(os.path.join(MLM, legacy, "iter_0000002"))
    mine = rank_files(ours[legacy])
    assert mine.keys() == theirs.keys()
    mine_state, theirs_state = mine["model_optim_rng.pt"], theirs["model_optim_rng.pt"]
    assert set(theirs_state) <= set(mine_state), set(theirs_state) - set(mine_state)
    assert mine_state["args"].ckpt_format == "torch"

    def shapes(state):
        return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}

    assert shapes(mine_state["model"]) == shapes(theirs_state["model"])

    def layout(value):  # nested keys and tensor shapes, values aside
        if isinstance(value, dict):
            return {k: layout(v) for k, v in value.items() if k != "params"}
        if isinstance(value, (list, tuple)):
            return [layout(v) for v in value]
        return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__

    assert layout(mine_state["optimizer"]) == layout(theirs_state["optimizer"])
    if "distrib_optim.pt" in theirs:
        assert layout(mine["distrib_optim.pt"]) == layout(theirs["distrib_optim.pt"])
    # The torch_dist record of the same run says the same.
    assert mine_state["opt_param_scheduler"] == safe_load.read_common(ours[dist])["opt_param_scheduler"]
    # The FLOPs so far: Megatron-LM core_v0.16.1 counts half the causal attention matmuls,
    # this project all (patch_megatron/flops.py): 2·s·a·d more per token and layer, x3 for
    # the backward, over 2 steps of 4 samples of 16 tokens through 2 layers.
    s, a, d = 16, 4, 8
    extra = 2 * (4 * 16) * 2 * 3 * (2 * s * a * d)
    assert (mine_state["num_floating_point_operations_so_far"]
            == theirs_state["num_floating_point_operations_so_far"] + extra)


@pytest.fixture(scope="module")
def resumed_from_megatron_lm(tmp_path_factory):
    """Each Megatron-LM fixture resumed here for a third step, keeping its schedule."""
    runs = {}
    for name, extra in MLM_CHECKPOINTS.items():
        load = str(tmp_path_factory.mktemp(name) / "load")
        shutil.copytree(os.path.join(MLM, name), load)
        runs[name] = load, pretrain(*MLM_FLAGS, *extra, "--train-iters", "3", "--load", load,
                                    "--use-checkpoint-opt_param-scheduler")
    return runs


def test_a_megatron_lm_checkpoints_schedule_is_kept_only_when_asked_for(tmp_path):
    load = str(tmp_path / "load")
    shutil.copytree(os.path.join(MLM, "llama_plain"), load)
    # One step longer than the saved run: as in Megatron-LM, the schedules then differ (decay
    # over 12 samples, not 8) and the checkpoint's is kept only when asked for.
    differs = pretrain(*MLM_FLAGS, "--train-iters", "3", "--load", load)
    assert differs.returncode == 3 and "--use-checkpoint-opt_param-scheduler" in differs.stderr


@pytest.mark.parametrize("name", list(MLM_CHECKPOINTS))
def test_megatron_lm_checkpoint_resumes_here(resumed_from_megatron_lm, name):
    load, result = resumed_from_megatron_lm[name]
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"loaded {load}/iter_0000002 (iteration 2); a Megatron-LM checkpoint" in result.stdout
    assert "RNG state not restored" not in result.stdout and "Adam starts afresh" not in result.stdout
    assert "iteration        3/       3 | consumed samples:           12 |" in result.stdout


@pytest.mark.parametrize("legacy, dist", LEGACY_AND_DIST)
def test_megatron_lm_legacy_checkpoint_continues_as_its_torch_dist_twin(resumed_from_megatron_lm,
                                                                         legacy, dist):
    """Megatron-LM saved the same run in both formats: resumed here, both take the same step."""
    def third_step(name):  # learning rate, loss and gradient norm, as logged
        stdout = resumed_from_megatron_lm[name][1].stdout
        line = next(l for l in stdout.splitlines() if "iteration        3/" in l)
        return re.findall(r"(learning rate|loss|grad norm): ([0-9.E+-]+)", line)

    assert [name for name, _ in third_step(dist)] == ["learning rate", "loss", "grad norm"]
    assert third_step(legacy) == third_step(dist)


# gpt_plain: Megatron-LM's default GPT, from the same flags without the LLaMA ones.
GPT_FLAGS = [f for f in MLM_FLAGS if f not in ("--normalization", "RMSNorm", "--swiglu",
                                               "--position-embedding-type", "rope",
                                               "--disable-bias-linear",
                                               "--untie-embeddings-and-output-weights")]


def test_megatron_lm_default_gpt_checkpoint_resumes_with_its_own_flags(tmp_path):
    load = str(tmp_path / "load")
    shutil.copytree(os.path.join(MLM, "gpt_plain"), load)
    record = record_of(load)
    assert record.model_shape.normalization == "LayerNorm"
    assert record.model_shape.activation == "gelu" and record.model_shape.add_bias_linear
    assert record.model_shape.position_embedding_type == "learned_absolute"
    result = pretrain(*GPT_FLAGS, "--train-iters", "3", "--load", load,
                      "--use-checkpoint-opt_param-scheduler")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"loaded {load}/iter_0000002 (iteration 2); a Megatron-LM checkpoint" in result.stdout
    assert "RNG state not restored" not in result.stdout and "Adam starts afresh" not in result.stdout
    assert "iteration        3/       3 | consumed samples:           12 |" in result.stdout


def test_patch_stage_starts_from_a_megatron_lm_checkpoint(tmp_path):
    load = str(tmp_path / "load")
    shutil.copytree(os.path.join(MLM, "llama_plain"), load)
    patch = ["--patch-size", "4", "--patch-data-fraction", "0.667", "--train-iters", "2"]
    refused = pretrain(*MLM_FLAGS, *patch, "--load", load)
    assert refused.returncode == 3 and "pass --finetune to start the patch stage" in refused.stderr
    result = pretrain(*MLM_FLAGS, *patch, "--load", load, "--finetune")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights only (--finetune)" in result.stdout


def test_first_schema_checkpoint_resumes(tmp_path):
    load = str(tmp_path / "v1")
    shutil.copytree(os.path.join(V1, "patch_stage"), load)
    flags = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
             "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
             "--mock-data", "--vocab-size", "128", "--make-vocab-size-divisible-by", "64",
             "--untie-embeddings-and-output-weights", "--patch-size", "4",
             "--patch-data-fraction", "0.667", "--lr", "3e-3", "--lr-warmup-iters", "1", "--cpu",
             "--ffn-hidden-size", "64", "--eval-iters", "0", "--log-interval", "1",
             *ARCHITECTURE_FLAGS]  # schema 1 knew only this architecture
    result = pretrain(*flags, "--train-iters", "3", "--load", load,
                      "--use-checkpoint-opt_param-scheduler")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"loaded {load}/iter_0000002 (iteration 2)" in result.stdout
    assert "iteration        3/       3 | consumed samples:           12 |" in result.stdout
