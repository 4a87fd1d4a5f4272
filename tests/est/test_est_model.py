"""EST layers on one process: the plain model at rate 1, the paper's formulas under a mask."""

import pytest
import torch

from patch_megatron.est.control import SubnetworkTraining, apply_subnetwork
from patch_megatron.est.sampler import LayerChoice, Layout, Subnetwork
from patch_megatron.est.schedule import ESTConfig
from patch_megatron.est.spec import subnetwork_block_spec
from patch_megatron.flops import KeptFractions
from patch_megatron.model.config import PatchGPTConfig
from patch_megatron.model.patch_gpt import build_model
import reference_est
from patch_megatron.llama_recipe import LLAMA_ARCHITECTURE

SHAPE = dict(num_layers=3, hidden_size=32, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=48, vocab_size=64, seq_length=6, **LLAMA_ARCHITECTURE)
BATCH = 3


@pytest.fixture(autouse=True)
def _world(model_parallel_world_of_one):
    yield


def _window(K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SHAPE["vocab_size"], (BATCH, K * (SHAPE["seq_length"] + 1)), generator=g)


def _loss_and_grads(model, window, K):
    model.zero_grad()
    loss = model(window[:, :-K], labels=window[:, K:]).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _pair(K, **overrides):
    """A plain model and an EST model with the same weights."""
    cfg = PatchGPTConfig(**{**SHAPE, **overrides}, patch_size=K)
    plain = build_model(cfg)
    subnet = build_model(cfg, layer_spec=subnetwork_block_spec)
    assert plain.state_dict().keys() == subnet.state_dict().keys()
    subnet.load_state_dict(plain.state_dict())
    return cfg, plain, subnet


@pytest.mark.parametrize("K", [1, 4])
def test_all_rates_one_equals_the_plain_model_exactly(K):
    cfg, plain, subnet = _pair(K)
    config = ESTConfig(enabled=True, stage_ends=(0.5,), layer_rates=(1.0,), head_rates=(1.0,),
                           mlp_rates=(1.0,))
    control = SubnetworkTraining(config, cfg, Layout(), train_iters=4)
    window = _window(K)
    ref_loss, ref_grads = _loss_and_grads(plain, window, K)
    for iteration in (1, 4):  # a "sampled" stage at rate 1 and the full stage
        control.set_step([subnet], iteration)
        loss, grads = _loss_and_grads(subnet, window, K)
        assert torch.equal(loss, ref_loss)
        for name, g in ref_grads.items():
            assert torch.equal(grads[name], g), name


def test_sliced_path_with_every_head_and_unit_equals_the_plain_model():
    """Explicit full index lists force the sliced matmuls: same numbers as the plain layers."""
    cfg, plain, subnet = _pair(2)
    everything = LayerChoice(heads=tuple(range(4)), units=tuple(range(48)))
    apply_subnetwork([subnet], Subnetwork((everything,) * 3))
    assert subnet.decoder.layers[0].mlp.linear_fc1.kept_rows is not None
    window = _window(2)
    ref_loss, ref_grads = _loss_and_grads(plain, window, 2)
    loss, grads = _loss_and_grads(subnet, window, 2)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


# Hand-written masks: layer 1 skipped; GQA with whole groups dropped, and with heads inside groups.
GROUP_MASK = (LayerChoice(heads=(2, 3), units=tuple(range(0, 48, 2))), None,
              LayerChoice(heads=(0, 1), units=(5, 7, 11, 40)))
HEADS_IN_GROUPS_MASK = (LayerChoice(heads=(1, 2), units=None), None,
                        LayerChoice(heads=(0, 3), units=tuple(range(12, 36))))


@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("mask", [GROUP_MASK, HEADS_IN_GROUPS_MASK], ids=["groups", "heads-in-groups"])
def test_subnetwork_matches_the_papers_formulas(K, mask):
    cfg, _, model = _pair(K)
    apply_subnetwork([model], Subnetwork(mask))
    window = _window(K, seed=K)
    loss, grads = _loss_and_grads(model, window, K)

    weights = {k: v.detach().clone().requires_grad_() for k, v in model.state_dict().items()
               if not k.endswith("_extra_state")}
    layer_masks = [None if c is None else (c.heads, c.units) for c in mask]
    ref_loss = reference_est.subnetwork_patch_loss(weights, window, layer_masks, patch_size=K,
                                                   heads=4, groups=2)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        ref = weights[name].grad
        torch.testing.assert_close(g, ref if ref is not None else torch.zeros_like(g),
                                   rtol=1e-4, atol=1e-6, msg=name)
    # The skipped layer got exact zero gradients; a kept layer's dropped units got none either.
    assert all(float(g.abs().max()) == 0 for n, g in grads.items() if "layers.1." in n)
    if mask[2].units is not None:
        fc2 = grads["decoder.layers.2.mlp.linear_fc2.weight"]
        dropped = [u for u in range(48) if u not in mask[2].units]
        assert float(fc2[:, dropped].abs().max()) == 0 and float(fc2[:, list(mask[2].units)].abs().max()) > 0


def test_sampled_masks_match_the_reference_and_eval_uses_the_full_model():
    cfg, plain, model = _pair(4)
    config = ESTConfig(enabled=True, stage_ends=(0.5,), layer_rates=(0.67,), head_rates=(0.5,),
                           mlp_rates=(0.5,), seed=3)
    control = SubnetworkTraining(config, cfg, Layout(), train_iters=10)
    window = _window(4, seed=5)
    kept = control.set_step([model], 2)
    mask = control.subnetwork(2)
    assert sum(c is None for c in mask.layers) == 1
    assert kept == KeptFractions(layers=2 / 3, attention_heads=0.5, mlp_units=0.5)
    loss, _ = _loss_and_grads(model, window, 4)
    weights = {k: v.detach() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    ref = reference_est.subnetwork_patch_loss(
        weights, window, [None if c is None else (c.heads, c.units) for c in mask.layers],
        patch_size=4, heads=4, groups=2)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        model.eval()
        plain.eval()
        full = model(window[:, :-4], labels=window[:, 4:])
        assert torch.equal(full, plain(window[:, :-4], labels=window[:, 4:]))
        model.train()
        assert not torch.equal(model(window[:, :-4], labels=window[:, 4:]), full)


def test_apply_refuses_a_model_without_est_layers():
    plain = build_model(PatchGPTConfig(**SHAPE))
    with pytest.raises(ValueError, match="layer_spec=subnetwork_block_spec"):
        apply_subnetwork([plain], Subnetwork.full(3))
