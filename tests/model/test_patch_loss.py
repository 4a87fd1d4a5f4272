"""The fused vocab-parallel patch loss against the paper's formula and against K separate calls."""

import pytest
import torch
from megatron.core import tensor_parallel

from patch_megatron.model.patch_loss import vocab_parallel_patch_cross_entropy
from reference_gpt import patch_nll


@pytest.fixture(autouse=True)
def _model_parallel(model_parallel_world_of_one):
    yield


def _case(K, seed=0, s=6, b=3, V=50):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, b, V, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, V, (s, b, K), generator=g)
    targets[0, 0, :] = targets[0, 0, 0]  # a patch that repeats one token K times
    weights = torch.rand(s, b, K, generator=g, dtype=torch.float64)
    return logits, targets, weights


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_paper_formula(K, masked):
    logits, targets, weights = _case(K)
    mask = (weights > 0.3).double() if masked else torch.ones_like(weights)

    fused_in = logits.clone().requires_grad_()
    fused = vocab_parallel_patch_cross_entropy(fused_in.clone(), targets)
    fused_loss = (fused * mask).sum() / mask.sum()
    fused_loss.backward()

    ref_in = logits.clone().requires_grad_()
    # the reference's layout is [b, T, ...]
    ref = patch_nll(ref_in.transpose(0, 1), targets.transpose(0, 1)).double().transpose(0, 1)
    ref_loss = (ref * mask).sum() / mask.sum()
    ref_loss.backward()

    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused_in.grad, ref_in.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("K", [1, 4])
def test_gradient_is_softmax_minus_multi_hot_over_K(K):
    logits, targets, _ = _case(K, seed=1)
    x = logits.clone().requires_grad_()
    vocab_parallel_patch_cross_entropy(x.clone(), targets).mean(-1).sum().backward()
    multi_hot = torch.zeros_like(logits).scatter_add_(-1, targets, torch.ones_like(targets, dtype=logits.dtype))
    torch.testing.assert_close(x.grad, logits.softmax(-1) - multi_hot / K, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("K", [1, 2, 4])
def test_equals_K_calls_of_megatron_cross_entropy(K):
    logits, targets, weights = _case(K, seed=2)
    fused_in = logits.float().clone().requires_grad_()
    fused = vocab_parallel_patch_cross_entropy(fused_in.clone(), targets)
    (fused * weights.float()).sum().backward()

    loop_in = logits.float().clone().requires_grad_()
    loop = torch.stack(
        [tensor_parallel.vocab_parallel_cross_entropy(loop_in.clone(), targets[..., k]) for k in range(K)],
        dim=-1,
    )
    (loop * weights.float()).sum().backward()

    torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_in.grad, loop_in.grad, rtol=1e-5, atol=1e-6)


def test_bf16_logits_give_bf16_grads_and_fp32_loss():
    logits, targets, _ = _case(4, seed=3)
    x = logits.bfloat16().requires_grad_()
    loss = vocab_parallel_patch_cross_entropy(x.clone(), targets)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    ref = patch_nll(logits.transpose(0, 1).bfloat16(), targets.transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(loss, ref.float(), rtol=2e-2, atol=2e-2)


def test_rejects_targets_without_patch_axis():
    logits, targets, _ = _case(2)
    with pytest.raises(ValueError, match=r"\[s, b, K\]"):
        vocab_parallel_patch_cross_entropy(logits, targets[..., 0])
