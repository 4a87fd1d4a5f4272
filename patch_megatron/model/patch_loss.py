"""The patch loss, fused into a vocab-parallel cross-entropy.

The output at patch position i is one distribution p_i over the vocabulary,
scored against all K tokens of patch i+1 (docs/method.md §1):
``nll[i, k] = logsumexp(logits_i) - logits_i[target_{i,k}]``.

With the vocabulary sharded over tensor-parallel ranks, one max and one
sum-of-exponentials per position are reduced across ranks, and the K target
logits of a position are gathered in the same reduction as the sum: two
all-reduces per call whatever K is, instead of K calls of megatron's
``vocab_parallel_cross_entropy`` (three each). Like megatron's version it
overwrites the logits in place with the softmax it keeps for backward, so its
memory is one logits-sized buffer for any K.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.utils import VocabUtility


class _VocabParallelPatchCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vocab_parallel_logits, targets, tp_group):
        # vocab_parallel_logits: [s, b, V/tp]; targets: [s, b, K] global token ids.
        # Half-precision logits are upcast (one copy); fp32/fp64 ones are worked on in place.
        logits = vocab_parallel_logits
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        logits_max = logits.max(dim=-1).values
        if tp_group is not None and tp_group.size() > 1:
            torch.distributed.all_reduce(logits_max, op=torch.distributed.ReduceOp.MAX, group=tp_group)
        logits.sub_(logits_max.unsqueeze(-1))

        rank = 0 if tp_group is None else tp_group.rank()
        world = 1 if tp_group is None else tp_group.size()
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            logits.size(-1), rank, world
        )
        in_shard = (targets >= start) & (targets < end)
        local_targets = torch.where(in_shard, targets - start, torch.zeros_like(targets))
        target_logits = logits.gather(-1, local_targets).masked_fill_(~in_shard, 0.0)

        logits.exp_()
        # One reduction carries the K target logits and the sum of exponentials.
        reduced = torch.cat([target_logits, logits.sum(dim=-1, keepdim=True)], dim=-1)
        if world > 1:
            torch.distributed.all_reduce(reduced, group=tp_group)
        target_logits, sum_exp = reduced[..., :-1], reduced[..., -1:]

        loss = torch.log(sum_exp) - target_logits
        logits.div_(sum_exp)  # now the softmax
        ctx.save_for_backward(logits, local_targets, in_shard)
        ctx.input_dtype = vocab_parallel_logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # d nll[i,k] / d logits_i = softmax_i - onehot(target_{i,k}), weighted by grad_loss[i,k].
        softmax, local_targets, in_shard = ctx.saved_tensors
        grad = softmax.mul_(grad_loss.sum(dim=-1, keepdim=True))
        grad.scatter_add_(-1, local_targets, -(grad_loss * in_shard))
        return grad.to(ctx.input_dtype), None, None


def vocab_parallel_patch_cross_entropy(vocab_parallel_logits, targets, tp_group=None):
    """Per-target negative log-likelihoods ``[s, b, K]`` of one distribution per position.

    ``vocab_parallel_logits`` is ``[s, b, V/tp]`` (megatron's layout, this rank's
    vocabulary shard) and is consumed: it is overwritten in place. ``targets``
    is ``[s, b, K]`` of global token ids.
    """
    if targets.dim() != vocab_parallel_logits.dim():
        raise ValueError(
            f"targets must be [s, b, K] beside logits [s, b, V]; got {tuple(targets.shape)} "
            f"and {tuple(vocab_parallel_logits.shape)}"
        )
    return _VocabParallelPatchCrossEntropy.apply(vocab_parallel_logits, targets, tp_group)
