"""Core attention through torch's scaled_dot_product_attention.

megatron-core's local DotProductAttention materialises the s x s score
matrix and expands grouped keys/values to every head. Without Transformer
Engine, this module hands the work to PyTorch's fused kernels instead (flash
or memory-efficient attention on GPU), causal and grouped-query natively. It
has no parameters, so checkpoints are the same with either implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine attention")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale  # None: 1/sqrt(head dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("packed sequences and attention bias need Transformer Engine attention")
        mask_type = attn_mask_type or self.attn_mask_type
        # megatron: [s, b, heads, d]; SDPA: [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = mask_type == AttnMaskType.causal
        mask = None
        if attention_mask is not None:  # megatron's masks are True where attention is forbidden
            mask = ~attention_mask
            if causal:
                mask = mask & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
                causal = False
        dropout = self.dropout if self.training else 0.0
        rng = (tensor_parallel.get_cuda_rng_tracker().fork()
               if dropout > 0 and not self.config.sequence_parallel else _null_context())
        with rng:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1],
            )
        # [b, heads, s, d] -> [s, b, heads*d]; heads are counted from the input, not the config,
        # so a caller may hand in a subset of heads.
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
