"""SDPAttention against megatron-core's own DotProductAttention."""

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from patch_megatron.model.config import PatchGPTConfig
from patch_megatron.model.sdpa_attention import SDPAttention


@pytest.fixture(autouse=True)
def _world(model_parallel_world_of_one):
    yield


@pytest.mark.parametrize("groups", [4, 2, 1])
def test_matches_megatron_dot_product_attention(groups):
    cfg = PatchGPTConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=groups,
                         vocab_size=64, seq_length=7, attention_dropout=0.0).transformer_config(cpu=True)
    kwargs = dict(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    ours, theirs = SDPAttention(**kwargs), DotProductAttention(**kwargs)
    g = torch.Generator().manual_seed(groups)
    s, b, d = 7, 2, 8
    q = torch.randn(s, b, 4, d, generator=g, requires_grad=True)
    k = torch.randn(s, b, groups, d, generator=g, requires_grad=True)
    v = torch.randn(s, b, groups, d, generator=g, requires_grad=True)
    out = ours(q, k, v, None)
    ref = theirs(q, k, v, None)
    assert out.shape == ref.shape == (s, b, 4 * d)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_explicit_padding_mask_combines_with_causal():
    cfg = PatchGPTConfig(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=64,
                         seq_length=5, attention_dropout=0.0).transformer_config(cpu=True)
    attn = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    q, k, v = (torch.randn(5, 1, 2, 8) for _ in range(3))
    forbidden = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    forbidden[..., 0] = True  # nobody may look at position 0 ...
    forbidden[..., 0, 0] = False  # ... except position 0 itself
    out = attn(q, k, v, forbidden)
    # position 1 then attends to itself only: its output is its own value
    torch.testing.assert_close(out[1].view(1, 2, 8), v[1], rtol=1e-5, atol=1e-6)
