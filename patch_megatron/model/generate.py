"""Sampling from a trained model (K=1) without labels: plain recompute, no KV cache.

Meant for smoke checks and evaluation scripts on one pipeline stage; serving
belongs to the Hugging Face export (tools/convert_to_hf.py).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             eos_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue ``prompt`` [b, n] by ``max_new_tokens``; greedy when temperature is 0."""
    if getattr(model, "patch_size", 1) != 1:
        raise ValueError(
            "generation needs a token-level model (patch size 1); convert the patch-stage "
            "checkpoint with tools/convert_patch_to_token.py first"
        )
    if not (model.pre_process and model.post_process):
        raise ValueError("generate() runs a whole model on one pipeline stage (PP=1)")
    was_training = model.training
    model.eval()
    tokens = prompt
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        logits = model(tokens)[:, -1, :]  # [b, V/tp]
        logits = gather_from_tensor_model_parallel_region(logits)[:, : model.vocab_size]
        if temperature > 0:
            probs = (logits.float() / temperature).softmax(-1)
            next_token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            next_token = logits.argmax(-1)
        if eos_id is not None:
            next_token = torch.where(finished, torch.full_like(next_token, eos_id), next_token)
            finished |= next_token == eos_id
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        if eos_id is not None and bool(finished.all()):
            break
    model.train(was_training)
    return tokens
