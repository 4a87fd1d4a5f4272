"""A table of sensible LLaMA-style shapes, with the parallelism, learning rate
and batch size we would start each at.

Sources of the choices: the patch-level paper's four models (370M-2.7B,
docs/method.md §1) verbatim, LLaMA/LLaMA-2/Code Llama shapes at 7B-70B, and GPT-style widths
below. Head size is 64 up to 1B-class widths and 128 above. Models from 20B
up use grouped-query attention with 8 groups, as LLaMA-2 70B does.

Parallelism assumes 80 GB-class GPUs with bf16 and a distributed optimizer:
tensor parallel within a node (at most 8), pipeline parallel only when one
node's tensor-parallel group cannot hold a layer stack.

Learning rate: 3e-4 is the paper's value for all its sizes; the smallest
models take a larger one and the largest a smaller one, as is common practice.
Batch: the paper's 2M tokens per step (1024 × 2048) for its sizes; smaller
models use fewer tokens per step so that small budgets still give enough steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from patch_megatron.model.shape import ModelShape, llama_shape


@dataclass(frozen=True)
class ShapeChoice:
    name: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    lr: float
    global_batch_tokens: int

    def model_shape(self, vocab_size: int) -> ModelShape:
        return llama_shape(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            vocab_size=vocab_size,
        )

    def parameters(self, vocab_size: int) -> int:
        return self.model_shape(vocab_size).parameter_count()


_M = 2**20  # tokens per step are given in units of 2^20 (the paper's "2M" is 2 * 2^20)

SHAPE_TABLE: tuple[ShapeChoice, ...] = (
    #            name       L    h      ffn   heads grp  TP PP  lr      tokens/step
    ShapeChoice("tiny",      4,   256,   704,   4,   4,   1, 1, 1e-3,   _M // 4),
    ShapeChoice("mini",      6,   512,  1408,   8,   8,   1, 1, 8e-4,   _M // 4),
    ShapeChoice("small",    12,   768,  2048,  12,  12,   1, 1, 6e-4,   _M // 2),
    ShapeChoice("base",     16,  1024,  2752,  16,  16,   1, 1, 4e-4,   _M),
    ShapeChoice("370M",     24,  1024,  2752,  16,  16,   1, 1, 3e-4,   2 * _M),
    ShapeChoice("780M",     24,  1536,  4128,  16,  16,   1, 1, 3e-4,   2 * _M),
    ShapeChoice("1.3B",     24,  2048,  5504,  16,  16,   1, 1, 3e-4,   2 * _M),
    ShapeChoice("2.7B",     32,  2560,  6880,  32,  32,   1, 1, 3e-4,   2 * _M),
    ShapeChoice("4B",       32,  3072,  8192,  24,  24,   2, 1, 3e-4,   2 * _M),
    ShapeChoice("7B",       32,  4096, 11008,  32,  32,   2, 1, 3e-4,   4 * _M),
    ShapeChoice("13B",      40,  5120, 13824,  40,  40,   4, 1, 3e-4,   4 * _M),
    ShapeChoice("22B",      48,  6144, 16384,  48,   8,   4, 2, 2e-4,   4 * _M),
    ShapeChoice("34B",      48,  8192, 22016,  64,   8,   8, 2, 1.5e-4, 4 * _M),
    ShapeChoice("70B",      80,  8192, 28672,  64,   8,   8, 4, 1.5e-4, 4 * _M),
    ShapeChoice("150B",     96, 12288, 32768,  96,   8,   8, 8, 1e-4,   8 * _M),
    ShapeChoice("400B",    128, 16384, 53248, 128,   8,   8, 16, 8e-5,  8 * _M),
)


def nearest_shape(parameters: float, vocab_size: int) -> ShapeChoice:
    """The table entry whose parameter count (with embeddings) is nearest on a log scale."""
    if parameters <= 0:
        raise ValueError(f"parameters must be positive, got {parameters}")
    return min(SHAPE_TABLE, key=lambda c: abs(math.log(c.parameters(vocab_size) / parameters)))


def shape_by_name(name: str) -> ShapeChoice:
    for choice in SHAPE_TABLE:
        if choice.name.lower() == name.lower():
            return choice
    names = ", ".join(c.name for c in SHAPE_TABLE)
    raise ValueError(f"unknown shape {name!r}; the table has: {names}")
