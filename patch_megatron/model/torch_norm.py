"""LayerNorm and RMSNorm for the no-Transformer-Engine, no-apex path, usable with sequence parallelism.

megatron's torch fallback (WrappedTorchNorm) refuses sequence parallelism
because it cannot mark its weight, and refuses ``--apply-layernorm-1p``; this
one marks its parameters so that finalize_model_grads all-reduces their
gradients over the tensor-parallel ranks (each saw only its slice of the
sequence), and keeps a zero-centred gamma (the weight stores gamma - 1, as
megatron's fused norms do) when the config asks for it.
"""

import torch
import torch.nn.functional as F


class TorchNorm(torch.nn.Module):
    """``config.normalization`` ("LayerNorm", with a bias, or "RMSNorm") over the last dimension."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused_megatron_kwargs):
        super().__init__()
        if config.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"normalization {config.normalization!r}: use LayerNorm or RMSNorm")
        self.eps = eps
        self.rms = config.normalization == "RMSNorm"
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        start = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(start(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(
            torch.zeros(hidden_size, dtype=config.params_dtype))
        for parameter in (self.weight, self.bias):
            if parameter is not None:
                setattr(parameter, "sequence_parallel", config.sequence_parallel)

    def forward(self, x):
        weight = self.weight + 1 if self.zero_centered_gamma else self.weight
        if self.rms:
            return F.rms_norm(x, weight.shape, weight, self.eps)
        return F.layer_norm(x, weight.shape, weight, self.bias, self.eps)
