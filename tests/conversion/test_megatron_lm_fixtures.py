"""What Megatron-LM's own save_checkpoint writes, read without Megatron-LM.

The fixtures in tests/fixtures/megatron_lm/ were written by Megatron-LM
core_v0.16.1's ``megatron.training.checkpointing.save_checkpoint`` (see
make_fixtures.py there for how). These tests pin down the things a loader of
Megatron-LM checkpoints relies on: where the flags, the iteration, the data
position, the LR schedule, the RNG states and the optimizer state live, under
which names, in which units. They read only with ``torch.load(weights_only=True)``
and torch.distributed.checkpoint's ``dcp_to_torch_save`` (no process group).
"""

import argparse
import json
import math
import os

import numpy
import pytest
import torch

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "fixtures", "megatron_lm")
ITERATION, GLOBAL_BATCH, WARMUP_ITERS = 2, 4, 1
HIDDEN, FFN, LAYERS, PADDED_VOCAB = 32, 64, 2, 192  # --swiglu: ffn = 4h * 2/3 rounded down to 64s

# Megatron-core's GPTModel with the local (non-TE) spec: layers stacked on a leading dim.
MODEL_SHAPES = {
    "embedding.word_embeddings.weight": (PADDED_VOCAB, HIDDEN),
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (LAYERS, HIDDEN),
    "decoder.layers.self_attention.linear_qkv.weight": (LAYERS, 3 * HIDDEN, HIDDEN),
    "decoder.layers.self_attention.linear_proj.weight": (LAYERS, HIDDEN, HIDDEN),
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": (LAYERS, HIDDEN),
    "decoder.layers.mlp.linear_fc1.weight": (LAYERS, 2 * FFN, HIDDEN),  # SwiGLU: gate and up
    "decoder.layers.mlp.linear_fc2.weight": (LAYERS, HIDDEN, FFN),
    "decoder.final_layernorm.weight": (HIDDEN,),
    "output_layer.weight": (PADDED_VOCAB, HIDDEN),
}
EXTRA_STATE = {f"decoder.layers.{m}._extra_state/shard_{layer}_{LAYERS}"
               for m in ("self_attention.linear_qkv", "self_attention.linear_proj",
                         "mlp.linear_fc1", "mlp.linear_fc2") for layer in range(LAYERS)}
RNG_KEY = "rng_state/shard_0.0_1.1"  # ShardedObject over (pp, tp) = (1, 1), at (0, 0)
DISTOPT_PREFIX = "optimizer.distributed.dp_group_idx_0."
DISTOPT_BUCKET = DISTOPT_PREFIX + "gbuf_idx_0.dtype_(torch.float32, torch.float32).bucket_idx_0."


def iteration_dir(name):
    return os.path.join(FIXTURES, name, f"iter_{ITERATION:07d}")


def load_common(name):
    import megatron.core  # noqa: F401  registers argparse.Namespace & co. as weights_only-safe

    return torch.load(os.path.join(iteration_dir(name), "common.pt"), map_location="cpu",
                      weights_only=True)


_sharded_cache = {}


def load_sharded(name, tmp_path_factory):
    # The fixtures' pickled items (RNG states, _extra_state, optimizer records) were written
    # under numpy 2 and name its module numpy._core, which numpy 1.x cannot import: a
    # Megatron-LM checkpoint saved with numpy 2 does not unpickle under numpy 1.
    if int(numpy.__version__.split(".")[0]) < 2:
        pytest.skip("the fixtures' pickled items need numpy 2 (they were saved under it)")
    if name not in _sharded_cache:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        import megatron.core  # noqa: F401  (the RNG shard holds numpy arrays)

        out = str(tmp_path_factory.mktemp(name) / "sharded.pt")
        dcp_to_torch_save(iteration_dir(name), out)
        _sharded_cache[name] = torch.load(out, map_location="cpu", weights_only=True)
    return _sharded_cache[name]


@pytest.fixture(params=["llama_plain", "llama_distopt"])
def fixture_name(request):
    return request.param


def test_namespace_is_safe_only_after_megatron_core_registers_it():
    import megatron.core  # noqa: F401

    assert argparse.Namespace in torch.serialization.get_safe_globals()


def test_layout_files(fixture_name):
    with open(os.path.join(FIXTURES, fixture_name, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == str(ITERATION)  # no newline
    with open(os.path.join(iteration_dir(fixture_name), "metadata.json")) as f:
        assert json.load(f) == {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                "common_backend": "torch", "common_backend_version": 1}
    files = set(os.listdir(iteration_dir(fixture_name)))
    assert {"common.pt", "metadata.json", ".metadata"} <= files
    assert any(f.endswith(".distcp") for f in files)


def test_common_pt_keys_and_args(fixture_name):
    common = load_common(fixture_name)
    assert set(common) == {"args", "checkpoint_version", "iteration", "optimizer",
                           "opt_param_scheduler", "num_floating_point_operations_so_far",
                           "content_metadata"}
    assert common["checkpoint_version"] == 3.0
    assert common["iteration"] == ITERATION
    assert common["num_floating_point_operations_so_far"] > 1e6  # training.num_floating_point_operations

    args = common["args"]
    assert isinstance(args, argparse.Namespace)  # the parser's own Namespace, not a dict
    expected = {
        "num_layers": LAYERS, "hidden_size": HIDDEN, "ffn_hidden_size": FFN,
        "num_attention_heads": 4, "kv_channels": HIDDEN // 4, "seq_length": 16,
        "padded_vocab_size": PADDED_VOCAB, "vocab_size": 128, "tokenizer_type": "NullTokenizer",
        "normalization": "RMSNorm", "swiglu": True, "position_embedding_type": "rope",
        "add_bias_linear": False, "untie_embeddings_and_output_weights": True,
        "group_query_attention": False, "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1, "ckpt_format": "torch_dist",
        "use_distributed_optimizer": fixture_name == "llama_distopt",
        "global_batch_size": GLOBAL_BATCH,
        # the data position lives in args, in samples; there is no top-level key for it
        "consumed_train_samples": ITERATION * GLOBAL_BATCH, "consumed_valid_samples": 0,
        "skipped_train_samples": 0, "iteration": ITERATION,
    }
    assert {k: getattr(args, k, "<missing>") for k in expected} == expected
    assert args.params_dtype == torch.float32
    # Without --group-query-attention the parser leaves num_query_groups at 1 and
    # training.num_floating_point_operations() sets it to the head count as a side
    # effect; a loader must read group_query_attention first.
    assert args.num_query_groups == 4
    assert not os.path.isabs(args.save), "the fixture must not record a machine path"


def test_scheduler_counts_samples(fixture_name):
    sched = load_common(fixture_name)["opt_param_scheduler"]
    assert set(sched) == {"max_lr", "lr_warmup_steps", "num_steps", "lr_decay_style",
                          "lr_decay_steps", "min_lr", "start_wd", "end_wd", "wd_incr_style",
                          "wd_incr_steps"}
    # --train-iters runs: every step count is in samples (iterations x global batch)
    assert sched["num_steps"] == ITERATION * GLOBAL_BATCH
    assert sched["lr_warmup_steps"] == WARMUP_ITERS * GLOBAL_BATCH
    assert sched["lr_decay_steps"] == sched["wd_incr_steps"] == ITERATION * GLOBAL_BATCH
    assert (sched["max_lr"], sched["min_lr"], sched["lr_decay_style"]) == (1e-3, 1e-4, "cosine")


def test_content_metadata(fixture_name):
    metadata = load_common(fixture_name)["content_metadata"]
    expected = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if fixture_name == "llama_distopt":
        expected["distrib_optim_sharding_type"] = "dp_reshardable"
        assert load_common(fixture_name)["optimizer"] == {"param_state_sharding_type": "dp_reshardable"}
    assert metadata == expected


def test_model_keys_and_extra_state(fixture_name, tmp_path_factory):
    sharded = load_sharded(fixture_name, tmp_path_factory)
    model = {k: v for k, v in sharded.items() if not k.startswith(("optimizer.", "rng_state"))}
    tensors = {k: tuple(v.shape) for k, v in model.items() if isinstance(v, torch.Tensor)}
    assert tensors == MODEL_SHAPES
    assert set(model) - set(tensors) == EXTRA_STATE
    assert all(model[k] == [None] for k in EXTRA_STATE)  # local spec: empty extra state, pickled
    assert all(model[k].dtype == torch.float32 for k in MODEL_SHAPES)


def test_rng_state(fixture_name, tmp_path_factory):
    sharded = load_sharded(fixture_name, tmp_path_factory)
    assert [k for k in sharded if k.startswith("rng_state")] == [RNG_KEY]
    (per_dp_rank,) = sharded[RNG_KEY]  # one list entry per data-parallel rank (1 here)
    (state,) = per_dp_rank
    assert set(state) == {"random_rng_state", "np_rng_state", "torch_rng_state",
                          "cuda_rng_state", "rng_tracker_states"}
    assert state["random_rng_state"][0] == 3 and len(state["random_rng_state"][1]) == 625
    assert state["np_rng_state"][0] == "MT19937" and state["np_rng_state"][1].shape == (624,)
    assert state["torch_rng_state"].dtype == torch.uint8
    assert set(state["rng_tracker_states"]) == {"model-parallel-rng", "data-parallel-rng",
                                                "expert-parallel-rng"}


def test_plain_optimizer(tmp_path_factory):
    common = load_common("llama_plain")["optimizer"]
    assert float(common["state"]["common_step"]) == ITERATION
    assert [g["wd_mult"] for g in common["param_groups"]] == [1.0, 0.0]
    assert all(g["lr"] == pytest.approx(1e-4) for g in common["param_groups"])
    sharded = load_sharded("llama_plain", tmp_path_factory)
    for moment in ("exp_avg", "exp_avg_sq"):
        state = {k[len(f"optimizer.state.{moment}."):]: v for k, v in sharded.items()
                 if k.startswith(f"optimizer.state.{moment}.")}
        assert {k: tuple(v.shape) for k, v in state.items()} == MODEL_SHAPES
        assert all(v.abs().sum() > 0 for v in state.values()), "two steps leave moments nonzero"
    assert set(k for k in sharded if k.startswith("optimizer.")) == {
        f"optimizer.state.{m}.{k}" for m in ("exp_avg", "exp_avg_sq") for k in MODEL_SHAPES}


def test_distributed_optimizer_buckets(tmp_path_factory):
    sharded = load_sharded("llama_distopt", tmp_path_factory)
    keys = {k for k in sharded if k.startswith("optimizer.")}
    objects = {DISTOPT_PREFIX + n + "/shard_0_1" for n in
               ("optimizer", "per_bucket_numel", "per_bucket_numel_unpadded")}
    assert keys == {DISTOPT_BUCKET + n for n in ("param", "exp_avg", "exp_avg_sq")} | objects
    (unpadded,) = sharded[DISTOPT_PREFIX + "per_bucket_numel_unpadded/shard_0_1"]
    (numel,) = unpadded[0][(torch.float32, torch.float32)]
    main = sharded[DISTOPT_BUCKET + "param"]
    assert main.shape == (numel,)
    model_numel = sum(math.prod(s) for s in MODEL_SHAPES.values())
    assert model_numel < numel  # parameters start 64-aligned in the buffer
    # Each parameter (per layer) lies contiguously at a 64-aligned offset of the
    # fp32 main-param buffer; the padding between is uninitialised memory, not zeros.
    plain = load_sharded("llama_plain", tmp_path_factory)
    spans = []
    for key in MODEL_SHAPES:
        per_layer = sharded[key].unbind(0) if key.startswith("decoder.layers.") else [sharded[key]]
        moments = {m: plain[f"optimizer.state.{m}.{key}"] for m in ("exp_avg", "exp_avg_sq")}
        for layer, weight in enumerate(per_layer):
            flat, size = weight.reshape(-1), weight.numel()
            offsets = [o for o in range(0, numel - size + 1, 64) if torch.equal(main[o:o + size], flat)]
            assert len(offsets) == 1, f"{key} (layer {layer}) found at {offsets}"
            spans.append((offsets[0], offsets[0] + size))
            for moment, value in moments.items():  # the same Adam state as the plain optimizer
                value = value[layer] if key.startswith("decoder.layers.") else value
                torch.testing.assert_close(
                    sharded[DISTOPT_BUCKET + moment][offsets[0]:offsets[0] + size],
                    value.reshape(-1), rtol=1e-5, atol=1e-8)
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "parameters overlap"
    assert sum(b - a for a, b in spans) == model_numel
    (inner,) = sharded[DISTOPT_PREFIX + "optimizer/shard_0_1"]
    assert [g["step"] for g in inner["param_groups"]] == [float(ITERATION)] * 2
    assert [g["wd_mult"] for g in inner["param_groups"]] == [1.0, 0.0]


def test_both_optimizers_trained_the_same_weights(tmp_path_factory):
    plain = load_sharded("llama_plain", tmp_path_factory)
    distopt = load_sharded("llama_distopt", tmp_path_factory)
    for key in MODEL_SHAPES:
        torch.testing.assert_close(plain[key], distopt[key], rtol=1e-5, atol=1e-6)
    plain_moment = plain["optimizer.state.exp_avg.output_layer.weight"]
    assert plain_moment.abs().sum() > 0


def test_converters_read_megatron_lm_checkpoints(tmp_path_factory, world_of_one):
    """open_checkpoint takes Megatron-LM's record; its weights equal torch's own reading of
    the shards, and tools/convert_to_hf.py exports them (129 = NullTokenizer's 128 + EOD)."""
    from safetensors.torch import load_file
    from two_stage import run_tool

    from patch_megatron.conversion.megatron_checkpoint import load_full_weights, open_checkpoint

    sharded = load_sharded("llama_plain", tmp_path_factory)  # (skips under numpy 1, see there)
    checkpoint = open_checkpoint(os.path.join(FIXTURES, "llama_plain"))
    assert checkpoint.record.source == "megatron-lm" and checkpoint.description.patch_size == 1
    weights = load_full_weights(checkpoint)
    for name in MODEL_SHAPES:
        if name.startswith("decoder.layers."):  # stacked on dim 0 in the checkpoint
            for layer in range(LAYERS):
                # Our local spec keeps the norms as modules of their own (torch RMSNorm).
                here = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
                        "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}.get(
                    name[len("decoder.layers."):], name[len("decoder.layers."):])
                ours = weights[f"decoder.layers.{layer}.{here}"]
                assert torch.equal(ours, sharded[name][layer]), (name, layer)
        else:
            assert torch.equal(weights[name], sharded[name]), name
    # The same run saved in Megatron-LM's legacy format: the same weights.
    legacy = load_full_weights(open_checkpoint(os.path.join(FIXTURES, "llama_torch")))
    assert legacy.keys() == weights.keys()
    assert all(torch.equal(legacy[name], weights[name]) for name in weights)
    out = str(tmp_path_factory.mktemp("hf") / "hf")
    code, err = run_tool("convert_to_hf", ["--load", os.path.join(FIXTURES, "llama_plain"),
                                           "--output", out])
    assert code == 0, err
    exported = load_file(os.path.join(out, "model.safetensors"))
    assert torch.equal(exported["model.embed_tokens.weight"],
                       sharded["embedding.word_embeddings.weight"][:129])
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == 129


def test_hugging_face_export_refuses_a_gpt_architecture(tmp_path):
    # Megatron-LM's default GPT (LayerNorm, GeLU, biases, learned positions) is no Llama.
    from two_stage import run_tool

    code, err = run_tool("convert_to_hf", ["--load", os.path.join(FIXTURES, "gpt_plain"),
                                           "--output", str(tmp_path / "hf")])
    assert code != 0 and not os.path.exists(tmp_path / "hf")
    if int(numpy.__version__.split(".")[0]) < 2:
        # The fixture's pickled RNG state was saved under numpy 2: the load says so first.
        assert "saved under numpy 2" in err and "install numpy >= 2" in err
        return
    assert "is not a Llama-architecture model" in err
    assert "normalization 'LayerNorm' (Llama: 'RMSNorm')" in err
