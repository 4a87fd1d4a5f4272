"""megatron-core layers that run a sampled subnetwork with sliced weights.

Each module holds the current step's choice in plain attributes (set by
``patch_megatron.est.control``) and uses it only while ``self.training``:
evaluation and generation always run the full model. With no choice set
every module is its megatron parent, unchanged.

* ``SubnetColumnParallelLinear``: only the kept output rows of the local
  weight take part in the matmul (``weight.index_select(0, rows)``).
* ``SubnetRowParallelLinear``: only the kept input columns; the partial sums
  are reduced over tensor-parallel ranks as usual, then multiplied by 1/p
  (the inverted-dropout scale) before any bias is added.
* ``SubnetSelfAttention``: splits the narrower fused QKV output into the kept
  query heads and key/value heads; the core attention (torch SDPA, counts
  heads from its inputs) runs on them.
* ``SubnetMLP``: the same local units in the gate and up halves of SwiGLU's
  fc1 and the matching columns of fc2.
* ``SubnetTransformerLayer``: a skipped layer returns its input (the residual
  path) and runs no matmul.

Gradients reach the full parameters through ``index_select``'s backward
(zeros for the rows that did not run), so megatron's DDP buffers, clipping
and optimizer see ordinary full-size gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    linear_with_grad_accumulation_and_async_allreduce,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer


def _tp_rank(group) -> int:
    return 0 if group is None or group.size() == 1 else group.rank()


def _check_sliceable(module) -> None:
    if module.config.gradient_accumulation_fusion:
        raise ValueError("EST slices weights, which gradient accumulation fusion cannot do: "
                         "turn --gradient-accumulation-fusion off with EST")


class SubnetColumnParallelLinear(ColumnParallelLinear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kept_rows: torch.Tensor | None = None  # local output rows that run this step

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if self.kept_rows is None or not self.training:
            return super().forward(input_, weight, runtime_gather_output)
        _check_sliceable(self)
        if weight is not None or self.gather_output or runtime_gather_output:
            raise ValueError("a sliced ColumnParallelLinear takes its own weight and keeps its "
                             "output split over tensor-parallel ranks")
        if self.allreduce_dgrad or self.sequence_parallel:
            input_parallel = input_  # the linear function gathers / reduces the input's grad itself
        else:
            input_parallel = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        bias = None if self.bias is None else self.bias.index_select(0, self.kept_rows)
        output = linear_with_grad_accumulation_and_async_allreduce(
            input=input_parallel,
            weight=self.weight.index_select(0, self.kept_rows),
            bias=None if self.skip_bias_add else bias,
            gradient_accumulation_fusion=False,
            allreduce_dgrad=self.allreduce_dgrad,
            sequence_parallel=self.sequence_parallel,
            tp_group=self.tp_group,
        )
        return output, bias if self.skip_bias_add else None


class SubnetRowParallelLinear(RowParallelLinear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kept_columns: torch.Tensor | None = None  # local input columns that run this step
        self.output_scale: float = 1.0  # 1/p

    def forward(self, input_):
        if self.kept_columns is None or not self.training:
            return super().forward(input_)
        _check_sliceable(self)
        if not self.input_is_parallel:
            raise ValueError("a sliced RowParallelLinear needs input that is already split")
        partial = F.linear(input_, self.weight.index_select(1, self.kept_columns))
        if self.sequence_parallel:
            output = reduce_scatter_to_sequence_parallel_region(partial, group=self.tp_group)
        else:
            output = reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)
        output = output * self.output_scale  # before the bias: the bias is not a sampled sum
        if self.skip_bias_add:
            return output, self.bias
        return (output + self.bias if self.bias is not None else output), None


class SubnetSelfAttention(SelfAttention):
    """Self-attention over a subset of query heads (and, in "groups" mode, of KV groups)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kept_groups_and_heads: tuple[int, int] | None = None  # local (groups, heads per group)
        for name in ("linear_qkv", "linear_proj"):
            if not isinstance(getattr(self, name), (SubnetColumnParallelLinear, SubnetRowParallelLinear)):
                raise TypeError(f"SubnetSelfAttention needs the EST {name} (build it with est.spec)")

    def set_kept_heads(self, heads: tuple[int, ...] | None) -> None:
        """Keep these global query heads (group-major numbering); None keeps all."""
        if heads is None:
            self.kept_groups_and_heads = None
            self.linear_qkv.kept_rows = self.linear_proj.kept_columns = None
            self.linear_proj.output_scale = 1.0
            return
        groups_local = self.num_query_groups_per_partition
        per_group = self.num_attention_heads_per_partition // groups_local
        hn = self.hidden_size_per_attention_head
        first_head = _tp_rank(self.tp_group) * groups_local * per_group
        local = [h - first_head for h in heads if 0 <= h - first_head < groups_local * per_group]
        by_group: dict[int, list[int]] = {}
        for h in local:
            by_group.setdefault(h // per_group, []).append(h % per_group)
        counts = {len(js) for js in by_group.values()}
        if len(counts) != 1:
            raise ValueError(f"layer {self.layer_number}: kept query heads must be equally many in "
                             f"every kept group on every TP rank, got {by_group}")
        qkv_rows, proj_columns = [], []
        for group, js in sorted(by_group.items()):
            base = group * (per_group + 2) * hn  # megatron's fused rows: q heads, then k, then v
            for j in js:
                qkv_rows.extend(range(base + j * hn, base + (j + 1) * hn))
                proj_columns.extend(range((group * per_group + j) * hn, (group * per_group + j + 1) * hn))
            qkv_rows.extend(range(base + per_group * hn, base + (per_group + 2) * hn))
        device = self.linear_qkv.weight.device
        self.kept_groups_and_heads = (len(by_group), counts.pop())
        self.linear_qkv.kept_rows = torch.tensor(qkv_rows, dtype=torch.long, device=device)
        self.linear_proj.kept_columns = torch.tensor(proj_columns, dtype=torch.long, device=device)
        self.linear_proj.output_scale = self.config.num_attention_heads / len(heads)

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False,
                                    split_qkv=True):
        if self.kept_groups_and_heads is None or not self.training:
            return super().get_query_key_value_tensors(
                hidden_states, key_value_states, output_gate=output_gate, split_qkv=split_qkv)
        if output_gate or not split_qkv:
            raise ValueError("EST supports neither gated attention nor fused QKV RoPE")
        groups, per_group = self.kept_groups_and_heads
        hn = self.hidden_size_per_attention_head
        mixed_qkv, _ = self.linear_qkv(hidden_states)  # [s, b, groups * (per_group + 2) * hn]
        mixed_qkv = mixed_qkv.view(*mixed_qkv.shape[:-1], groups, (per_group + 2) * hn)
        query, key, value = torch.split(mixed_qkv, [per_group * hn, hn, hn], dim=3)
        query = query.reshape(query.size(0), query.size(1), -1, hn)
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        if self.k_layernorm is not None:
            key = self.k_layernorm(key)
        return query, key, value


class SubnetMLP(MLP):
    """SwiGLU (or plain) MLP over a subset of its hidden units.

    It adds methods only: megatron's TransformerLayer hands its TP group only
    to a spec whose module is exactly ``MLP``, so the EST spec names ``MLP``
    and ``SubnetTransformerLayer`` turns the built module into this class.
    """

    @classmethod
    def adopt(cls, mlp: MLP) -> "SubnetMLP":
        if type(mlp) is not MLP:
            raise TypeError(f"EST samples units of megatron's dense MLP, not {type(mlp).__name__}")
        if not isinstance(mlp.linear_fc1, SubnetColumnParallelLinear) or not isinstance(
                mlp.linear_fc2, SubnetRowParallelLinear):
            raise TypeError("SubnetMLP needs the EST linear_fc1/linear_fc2 (build it with est.spec)")
        mlp.__class__ = cls
        return mlp

    def set_kept_units(self, units: tuple[int, ...] | None) -> None:
        """Keep these global hidden units; None keeps all."""
        if units is None:
            self.linear_fc1.kept_rows = self.linear_fc2.kept_columns = None
            self.linear_fc2.output_scale = 1.0
            return
        units_local = self.linear_fc2.weight.shape[1]
        first = _tp_rank(self.tp_group) * units_local
        local = [u - first for u in units if 0 <= u - first < units_local]
        if not local:
            raise ValueError(f"every TP rank must keep some MLP units; rank of unit {first} keeps none")
        # The gated fc1 holds [gate rows; up rows] of this rank: a unit is one row of each.
        rows = local + [units_local + u for u in local] if self.config.gated_linear_unit else local
        device = self.linear_fc1.weight.device
        self.linear_fc1.kept_rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.linear_fc2.kept_columns = torch.tensor(local, dtype=torch.long, device=device)
        self.linear_fc2.output_scale = self.config.ffn_hidden_size / len(units)


def _zero_touching(hidden_states, parameters):
    """``hidden_states`` plus an exact zero that depends on one element of every parameter.

    A skipped layer runs no matmul, but its parameters still receive (zero)
    gradients this way: megatron DDP's per-bucket gradient-ready counting
    (overlap_grad_reduce) then sees every parameter report, as in a full step.
    The cost is one element per parameter, plus the zero gradient buffers
    autograd hands to DDP's hooks.
    """
    touch = sum(p.reshape(-1)[:1].sum() for p in parameters if p.requires_grad)
    if isinstance(touch, int):  # no trainable parameter
        return hidden_states.clone()
    return hidden_states + (touch * 0.0).to(hidden_states.dtype)


class SubnetTransformerLayer(TransformerLayer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped = False
        if not isinstance(self.self_attention, SubnetSelfAttention):
            raise TypeError("SubnetTransformerLayer needs SubnetSelfAttention (build it with est.spec)")
        self.mlp = SubnetMLP.adopt(self.mlp)

    def set_choice(self, choice) -> None:
        """Apply this layer's part of a global mask (an est.sampler.LayerChoice, or None to skip)."""
        self.skipped = choice is None
        self.self_attention.set_kept_heads(None if choice is None else choice.heads)
        self.mlp.set_kept_units(None if choice is None else choice.units)

    def forward(self, *args, **kwargs):
        if not (self.skipped and self.training):
            return super().forward(*args, **kwargs)
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return _zero_touching(hidden_states, self.parameters()), kwargs.get("context")
