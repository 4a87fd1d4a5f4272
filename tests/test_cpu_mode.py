"""CPU mode hands megatron-core torch's fused CPU AdamW, with the same update."""

import torch

from patch_megatron import cpu_mode


def test_megatron_builds_a_fused_adamw_that_matches_the_per_tensor_one():
    cpu_mode.install()
    import megatron.core.optimizer as megatron_optimizer

    # Both names megatron-core may use: its module-level fallback and torch.optim through its view.
    for adamw in (megatron_optimizer.Adam, megatron_optimizer.torch.optim.AdamW):
        assert issubclass(adamw, torch.optim.AdamW)
        torch.manual_seed(0)
        fused_params = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
        plain_params = [torch.nn.Parameter(p.detach().clone()) for p in fused_params]
        fused = adamw(fused_params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        plain = torch.optim.AdamW(plain_params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        assert fused.param_groups[0]["fused"] and not plain.param_groups[0]["fused"]
        for step in range(3):
            grads = [torch.randn_like(p) for p in fused_params]
            for params, optimizer in ((fused_params, fused), (plain_params, plain)):
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                optimizer.step()
        for a, b in zip(fused_params, plain_params):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The real torch is untouched outside megatron-core.
    assert torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]).param_groups[0]["fused"] is None
