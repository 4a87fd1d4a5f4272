"""RMSNorm for the no-Transformer-Engine, no-apex path, usable with sequence parallelism.

megatron's torch fallback (WrappedTorchNorm) refuses sequence parallelism
because it cannot mark its weight; this one marks it so that
finalize_model_grads all-reduces its gradient over the tensor-parallel ranks,
which each saw only their slice of the sequence.
"""

import torch
import torch.nn.functional as F


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused_megatron_kwargs):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
