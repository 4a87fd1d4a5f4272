"""Megatron-LM command lines build here what Megatron-LM builds from them.

The expected side is ``tests/fixtures/megatron_lm/conformance.json``, written by
Megatron-LM core_v0.16.1's own parser, ``core_transformer_config_from_args``,
``model_provider`` and ``get_optimizer_param_scheduler``
(``tests/fixtures/megatron_lm/make_conformance.py``): GPT-3-style command lines
with no LLaMA flag, Megatron-LM's LLaMA-3 example, functional-test
configurations, the variants its flags name, and the paper's recipe. Each is
parsed by ``pretrain_patch_gpt.py``'s parser and built by its builders here.
"""

import json
import os
import sys

import pytest

from patch_megatron.parallel import initialize_world_of_one

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "megatron_lm")
sys.path.insert(0, FIXTURES)
from make_conformance import (  # noqa: E402
    CONFIG_FIELDS, COMMAND_LINES, OPTIMIZER_FIELDS, SCHEDULER_FIELDS, argv_of, param_groups,
)

with open(os.path.join(FIXTURES, "conformance.json")) as f:
    EXPECTED = json.load(f)["command_lines"]


@pytest.fixture(scope="module")
def built():
    """Each command line through this project's parser and builders (world of one, CPU)."""
    from patch_megatron.training import build
    from patch_megatron.training.arguments import check_world_size, parse_args

    initialize_world_of_one(1234)
    out = {}
    for name in COMMAND_LINES:
        args = parse_args(argv_of(name) + ["--cpu"])
        check_world_size(args, 1)
        # NullTokenizer: --vocab-size ids plus its end-of-document id, as Megatron-LM counts.
        config = build.model_config(args, args.vocab_size + 1)
        chunks = build.build_ddp_model(args, config)
        assert len(chunks) == 1
        optimizer = build.build_optimizer(args, chunks)
        scheduler = build.build_scheduler(args, args.stage, optimizer)
        out[name] = (args, chunks[0], scheduler, optimizer)
    return out


def test_the_fixture_covers_gpt3_and_llama_command_lines():
    assert set(EXPECTED) == set(COMMAND_LINES)
    assert {e["activation"] for e in EXPECTED.values()} == {"gelu", "silu", "squared_relu"}
    assert {e["config"]["normalization"] for e in EXPECTED.values()} == {"LayerNorm", "RMSNorm"}
    assert EXPECTED["gpt_defaults"]["position_embedding_type"] == "learned_absolute"


@pytest.mark.parametrize("name", sorted(COMMAND_LINES))
def test_model_parameters_match_megatron_lm(built, name):
    ddp = built[name][1]
    ours = {k: list(v.shape) for k, v in ddp.module.state_dict().items()
            if not k.endswith("_extra_state")}
    assert ours == EXPECTED[name]["parameters"]


@pytest.mark.parametrize("name", sorted(COMMAND_LINES))
def test_transformer_config_matches_megatron_lm(built, name):
    ddp = built[name][1]
    config, module, expected = ddp.module.config, ddp.module, EXPECTED[name]
    ours = {f: getattr(config, f) for f in CONFIG_FIELDS}
    assert ours == expected["config"]
    assert config.activation_func.__name__ == expected["activation"]
    assert module.position_embedding_type == expected["position_embedding_type"]
    assert module.rotary_percent == expected["rotary_percent"]
    assert module.share_embeddings_and_output_weights == \
        expected["share_embeddings_and_output_weights"]


@pytest.mark.parametrize("name", sorted(COMMAND_LINES))
def test_optimizer_and_schedule_match_megatron_lm(built, name):
    from patch_megatron.training import build

    args, _, scheduler, optimizer = built[name]
    expected = EXPECTED[name]
    assert {f: getattr(args, f) for f in OPTIMIZER_FIELDS} == expected["optimizer"]
    ours = {f: getattr(scheduler, f, None) for f in SCHEDULER_FIELDS}
    assert ours == expected["scheduler"]
    assert build.grad_reduce_in_fp32(args) == expected["grad_reduce_in_fp32"]
    # weight decay off for biases and norms, --decoupled-lr for the embedding and output layer
    assert param_groups(optimizer) == expected["param_groups"]
    assert args.stage.global_batch_size == expected["global_batch_size"]


@pytest.mark.parametrize("name", sorted(COMMAND_LINES))
def test_ddp_validates_gradients_as_megatron_lm(built, name):
    # Megatron-LM's DDP config: check_for_nan_in_grad = --check-for-nan-in-loss-and-grad (on by
    # default), check_for_large_grads = --check-for-large-grads; except that here an fp16 run's
    # overflowing gradients are left to its loss scaler (patch_megatron/training/rerun.py).
    args, ddp = built[name][0], built[name][1]
    assert ddp.ddp_config.check_for_nan_in_grad == (not args.fp16)
    assert ddp.ddp_config.check_for_large_grads is False


def test_check_for_large_grads_reaches_megatron_cores_ddp():
    from patch_megatron.training import build
    from patch_megatron.training.arguments import check_world_size, parse_args

    initialize_world_of_one(1234)
    args = parse_args(argv_of(sorted(COMMAND_LINES)[0]) + ["--cpu", "--check-for-large-grads"])
    check_world_size(args, 1)
    ddp = build.build_ddp_model(args, build.model_config(args, args.vocab_size + 1))[0]
    assert ddp.ddp_config.check_for_large_grads is True
