"""Exact matmul FLOPs of the project's decoder, token and patch stage.

What is counted
---------------
Only matrix multiplications, at 2 FLOPs per multiply-add. Per transformer
layer and per model position, forward:

* QKV projection   2·h·(a·d + 2·g·d)      (grouped-query attention, no bias)
* attention scores 2·s·a·d                (Q·Kᵀ against all s positions)
* attention values 2·s·a·d                (probabilities · V)
* output proj      2·a·d·h
* MLP fc1          2·h·(2·f) with SwiGLU   (gate and up halves), 2·h·f otherwise
* MLP fc2          2·f·h

and once per position after the last layer the untied LM head, 2·h·V over
the padded vocabulary. Backward is counted as twice the forward (gradients
w.r.t. activations and w.r.t. weights), so training = 3 × forward.

Here h = hidden_size, a = num_attention_heads, g = num_query_groups,
d = kv_channels, f = ffn_hidden_size, V = vocab_size, s = positions.

Conventions (stated, because published numbers differ on them)
--------------------------------------------------------------
* Causal masking: the score and value matmuls are counted over the full
  s × s square, not halved: the convention of the Megatron-LM paper
  (Narayanan et al. 2021) and of Megatron-LM's ``num_floating_point_operations``
  before it began halving them for the causal mask (core_v0.16.1 halves
  them). Against core_v0.16.1's count ours is higher by ``2·s·a·d`` per
  position and layer in the forward (3.7% for a 2-layer, hidden-32,
  16-position test model; less the wider the model). Kernels that skip the
  masked half do about that many fewer FLOPs.
* Not counted: norms, RoPE, softmax, activations, biases, residual adds,
  dropout, the input embedding and learned-position lookups, and the patch stage's mean over K token embeddings
  (K·T·h additions per sample: under 1/h of a single hidden×hidden matmul
  per token, far below the rounding of any of the terms above).
* Patch stage with patch size K: a sample holds K·T tokens, the transformer
  sees T positions and the LM head runs T times (one distribution per patch
  position, scored against K targets without further matmuls). FLOPs per
  *sample* are therefore those of a T-position token sample, and FLOPs per
  *token* are 1/K of the token stage's. K = 1 is ordinary training.
* EST (Evolving Subnetwork Training) kept fractions are expected values:
  the layer fraction scales every per-layer term; the head fraction scales
  the query part of the QKV projection, both attention matmuls and the
  output projection; the query-group fraction (defaults to the head
  fraction, i.e. whole groups are dropped with their heads, as in ordinary
  multi-head attention) scales the K and V projections; the MLP-unit
  fraction scales fc1 and fc2. The embedding and the LM head always run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from patch_megatron.model.shape import ModelShape

# Dense bf16 peak of one GPU, in TFLOP/s, from the vendors' data sheets
# (SXM parts, without structured sparsity). H200 has H100's compute units.
GPU_PEAK_BF16_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
}

# Dense bf16 peaks (TFLOP/s, data-sheet figures halved to remove 2:4 sparsity) of boards whose
# CUDA name contains a preset's name but which run slower than the SXM part: matching "H100"
# alone would give an H100 PCIe card 989 and understate its MFU by a quarter. Checked first.
BOARD_VARIANT_PEAK_BF16_TFLOPS = {
    "H100 PCIE": 756.0,  # 1513 sparse
    "H100 NVL": 835.0,  # 1671 sparse
    "H200 NVL": 835.0,  # 1671 sparse
}


def peak_tflops_of_gpu(device_name: str) -> Optional[float]:
    """Dense bf16 peak of a GPU from its CUDA name (``torch.cuda.get_device_name()``), e.g.
    "NVIDIA H100 80GB HBM3" -> 989; None for a GPU this table does not know."""
    name = device_name.upper()
    for table in (BOARD_VARIANT_PEAK_BF16_TFLOPS, GPU_PEAK_BF16_TFLOPS):
        for gpu, peak in table.items():
            if gpu in name:
                return peak
    return None


@dataclass(frozen=True)
class KeptFractions:
    """Expected fraction of each part that runs in a training step (EST).

    All default to 1.0 (the full model). ``query_groups`` defaults to
    ``attention_heads``: dropping a head drops its K/V projection too, which
    is exact for multi-head attention and for sampling whole GQA groups. Pass
    1.0 when query heads are sampled inside groups that all stay.
    """

    layers: float = 1.0
    attention_heads: float = 1.0
    mlp_units: float = 1.0
    query_groups: Optional[float] = field(default=None)

    def __post_init__(self):
        if self.query_groups is None:
            object.__setattr__(self, "query_groups", self.attention_heads)
        for name in ("layers", "attention_heads", "mlp_units", "query_groups"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"KeptFractions.{name} must lie in (0, 1], got {value!r}")


FULL_MODEL = KeptFractions()


def _check_positions(seq_length: int, patch_size: int) -> None:
    if not isinstance(seq_length, int) or seq_length < 1:
        raise ValueError(f"seq_length (model positions T) must be a positive integer, got {seq_length!r}")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size K must be an integer >= 1, got {patch_size!r}")


def layer_forward_flops(shape: ModelShape, seq_length: int, kept: KeptFractions = FULL_MODEL) -> float:
    """Forward matmul FLOPs of one transformer layer over ``seq_length``
    positions, scaled by the kept head/group/unit fractions (not by the
    layer fraction)."""
    _check_positions(seq_length, 1)
    s, h, f, d = seq_length, shape.hidden_size, shape.ffn_hidden_size, shape.kv_channels
    query_width = shape.num_attention_heads * d * kept.attention_heads
    kv_width = shape.num_query_groups * d * kept.query_groups
    qkv = 2 * s * h * (query_width + 2 * kv_width)
    scores = 2 * s * s * query_width  # full s x s square: Megatron-LM convention
    values = 2 * s * s * query_width
    out_proj = 2 * s * query_width * h
    mlp_units = f * kept.mlp_units
    fc1 = 2 * s * h * (2 if shape.gated_linear_unit else 1) * mlp_units  # SwiGLU: gate and up
    fc2 = 2 * s * mlp_units * h
    return qkv + scores + values + out_proj + fc1 + fc2


def lm_head_forward_flops(shape: ModelShape, seq_length: int) -> float:
    """Forward FLOPs of the untied output layer, once per model position."""
    _check_positions(seq_length, 1)
    return 2 * seq_length * shape.hidden_size * shape.vocab_size


def forward_flops_per_sample(
    shape: ModelShape, seq_length: int, patch_size: int = 1, kept: KeptFractions = FULL_MODEL
) -> float:
    """Forward matmul FLOPs of one sample of ``patch_size × seq_length`` tokens.

    ``seq_length`` is T, the positions the transformer sees (patches in the
    patch stage). The result does not depend on ``patch_size``: the patch
    stage's saving shows up per token, not per sample.
    """
    _check_positions(seq_length, patch_size)
    layers = shape.num_layers * kept.layers
    return layers * layer_forward_flops(shape, seq_length, kept) + lm_head_forward_flops(shape, seq_length)


def training_flops_per_sample(
    shape: ModelShape, seq_length: int, patch_size: int = 1, kept: KeptFractions = FULL_MODEL
) -> float:
    """Forward + backward matmul FLOPs of one training sample (backward = 2 × forward)."""
    return 3 * forward_flops_per_sample(shape, seq_length, patch_size, kept)


def training_flops_per_iteration(
    shape: ModelShape,
    seq_length: int,
    global_batch_size: int,
    patch_size: int = 1,
    kept: KeptFractions = FULL_MODEL,
) -> float:
    """Training FLOPs of one optimizer step over ``global_batch_size`` samples."""
    if not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise ValueError(f"global_batch_size must be a positive integer, got {global_batch_size!r}")
    return global_batch_size * training_flops_per_sample(shape, seq_length, patch_size, kept)


def flops_per_token(
    shape: ModelShape, seq_length: int, patch_size: int = 1, kept: KeptFractions = FULL_MODEL
) -> float:
    """Training FLOPs per data token: per-sample FLOPs over the K·T tokens a sample holds."""
    return training_flops_per_sample(shape, seq_length, patch_size, kept) / (patch_size * seq_length)


def model_flops_utilization(achieved_flops_per_second: float, peak_flops_per_second: float) -> float:
    """MFU: achieved model FLOP/s (as counted here) over the hardware peak."""
    if peak_flops_per_second <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak_flops_per_second!r}")
    return achieved_flops_per_second / peak_flops_per_second
