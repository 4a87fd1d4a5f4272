"""The λ split: which training documents belong to the patch stage and which to the token stage.

The *training stream* of one data prefix is its train-split documents in an
order fixed by the seed (a permutation, so a corpus sorted by source is still
mixed). A run with a training-token budget B reads a window at the head of the
stream: the patch stage owns the documents that make up its first part
(enough tokens for ceil(λB / (K·T)) patch samples), the token stage owns the
documents right after it (enough for ceil((1-λ)B / T) token samples). The two
sets are disjoint and together cover the window. When the prefix holds fewer
tokens than the window, both parts shrink in proportion to cover all of it
(each stage then repeats its own documents; neither reads the other's). With
no budget, the patch stage owns the first λ of the stream's tokens and the
token stage the rest.

Each stage's megatron GPTDataset then shuffles only its own documents, so the
split needs no manual file splitting and is the same every time for a seed.
"""

from dataclasses import dataclass
from typing import Optional

import numpy

from patch_megatron.stage import Stage

PATCH, TOKEN = Stage.PATCH.value, Stage.TOKEN.value  # plain strings: dataset configs hold them
_STREAM_SALT = 0x2407_12665  # keeps the stream order independent of other seeded draws


@dataclass(frozen=True)
class StreamWindow:
    """Stream tokens owned by each stage for one prefix."""

    patch_tokens: int
    token_tokens: int


def stage_samples(stage: str, train_token_budget: int, patch_data_fraction: float,
                  seq_length: int, patch_size: int) -> int:
    """Training samples a stage consumes from the budget (K·T tokens per patch sample)."""
    # Integer token counts first, so that λ = 2/3 does not round 40 samples up to 41.
    patch_tokens = int(round(patch_data_fraction * train_token_budget))
    if stage == PATCH:
        return -(-patch_tokens // (patch_size * seq_length))
    return -(-(train_token_budget - patch_tokens) // seq_length)


def stream_tokens_for_samples(samples: int, sample_tokens: int) -> int:
    """Stream tokens megatron's GPTDataset reads for ``samples`` of ``sample_tokens`` each.

    Consecutive samples share one boundary token (a window of L+1 tokens steps L).
    """
    return 0 if samples <= 0 else samples * sample_tokens + 1


def window_for_prefix(train_tokens: int, patch_data_fraction: float,
                      patch_stream_tokens: Optional[int],
                      token_stream_tokens: Optional[int]) -> StreamWindow:
    """Split one prefix's train tokens between the stages (see module docs)."""
    if patch_stream_tokens is None or token_stream_tokens is None:
        patch = int(round(patch_data_fraction * train_tokens))
        return StreamWindow(patch, train_tokens - patch)
    wanted = patch_stream_tokens + token_stream_tokens
    if wanted <= train_tokens:
        return StreamWindow(patch_stream_tokens, token_stream_tokens)
    patch = int(round(train_tokens * patch_stream_tokens / wanted)) if wanted else 0
    return StreamWindow(patch, train_tokens - patch)


def stream_order(train_documents: numpy.ndarray, seed: int) -> numpy.ndarray:
    """The prefix's train documents in stream order (a seeded permutation)."""
    generator = numpy.random.Generator(numpy.random.PCG64([seed, _STREAM_SALT]))
    return train_documents[generator.permutation(len(train_documents))]


def stage_documents(train_documents: numpy.ndarray, document_tokens: numpy.ndarray,
                    window: StreamWindow, stage: str, seed: int) -> numpy.ndarray:
    """Sorted document indices the stage owns.

    ``document_tokens[i]`` is the length of ``train_documents[i]``. Documents are
    taken whole along the stream until each stage's token count is reached.
    """
    if stage not in (PATCH, TOKEN):
        raise ValueError(f"stage must be {PATCH!r} or {TOKEN!r}, got {stage!r}")
    lengths = dict(zip(train_documents.tolist(), document_tokens.tolist()))
    order = stream_order(train_documents, seed)
    cumulative = numpy.cumsum([lengths[d] for d in order.tolist()], dtype=numpy.int64)
    patch_end = _documents_covering(cumulative, window.patch_tokens)
    if stage == PATCH:
        chosen = order[:patch_end]
    else:
        before = int(cumulative[patch_end - 1]) if patch_end else 0
        token_end = patch_end + _documents_covering(cumulative[patch_end:] - before,
                                                    window.token_tokens)
        chosen = order[patch_end:token_end]
    return numpy.sort(chosen).astype(train_documents.dtype)


def _documents_covering(cumulative: numpy.ndarray, tokens: int) -> int:
    """How many leading documents it takes to hold ``tokens`` tokens."""
    if tokens <= 0 or len(cumulative) == 0:
        return 0
    return min(len(cumulative), int(numpy.searchsorted(cumulative, tokens, side="left")) + 1)
