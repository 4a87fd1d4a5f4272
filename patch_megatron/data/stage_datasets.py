"""Train/valid/test datasets of one training stage, through megatron-core's builder."""

import errno
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import (
    BlendedMegatronDatasetBuilder)
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix, parse_and_normalize_split)
from megatron.core.datasets.utils import get_blend_from_list

from patch_megatron.data.fim import FIMConfig
from patch_megatron.data.index_cache import (
    DEFAULT_CACHE_FOLDER, check_index_cache, record_fingerprints)
from patch_megatron.data.index_validation import DatasetFileError, inspect_prefix
from patch_megatron.data.patch_dataset import (
    PatchGPTDataset, PatchGPTDatasetConfig, raw_sequence_length)
from patch_megatron.data.stream_split import (
    PATCH, TOKEN, stage_samples, stream_tokens_for_samples, window_for_prefix)

# megatron-core asks each blended dataset for this much more than its share.
_BLEND_SURPLUS = 0.005
# Errors of creating/writing the index cache that another --data-cache-path fixes.
_CACHE_WRITE_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST,
                       errno.ENOSPC, errno.EDQUOT}


@dataclass
class StageDatasets:
    train: Any
    valid: Any
    test: Any
    train_samples: Optional[int]
    """Samples the train dataset was built for (the stage's share of the budget)."""
    stream_windows: Optional[Dict[str, List[int]]]
    """Per prefix, [patch, token] stream tokens of the λ split (None: no split)."""


def build_stage_datasets(
    data_path: Sequence[str], split: str, seq_length: int, patch_size: int, stage: str,
    patch_data_fraction: float, train_token_budget: Optional[int], seed: int,
    data_cache_path: Optional[str], train_samples: Optional[int] = None,
    valid_samples: Optional[int] = None, test_samples: Optional[int] = None, *,
    tokenizer: Any, eval_patch_size: int = 1, eod_mask_loss: bool = False,
    check_token_ids: bool = True, is_built_on_rank: Optional[Callable[[], bool]] = None,
    fim: Optional[FIMConfig] = None,
) -> StageDatasets:
    """Build one stage's datasets with megatron-core's BlendedMegatronDatasetBuilder.

    Args:
        data_path: Megatron's ``--data-path``: ``[PREFIX]`` or ``[W1, P1, W2, P2, ...]``.
        split: Megatron's ``--split``, e.g. ``"969,30,1"`` (split by document).
        seq_length: T, model positions (patches in the patch stage, tokens in the
            token stage); the same T for both stages is the paper's setup.
        patch_size: K of the run. The patch stage serves K*T tokens per sample, the
            token stage T; K also sizes the patch stage's share of the stream.
        stage: ``"patch"`` or ``"token"``.
        patch_data_fraction: λ, the patch stage's fraction of the training stream.
        train_token_budget: tokens the whole run trains on (both stages); None:
            split the train documents λ : 1-λ by tokens.
        seed: seeds the stream order and megatron's shuffles (deterministic).
        data_cache_path: where megatron-core caches its index files.
        train_samples: samples to build; None: the stage's share of the budget
            (ceil(λB/(K·T)) or ceil((1-λ)B/T)), or one epoch with no budget.
        valid_samples, test_samples: samples to build (None: one epoch).
        tokenizer: a megatron-core tokenizer (``patch_megatron.data.tokenizers``).
        eval_patch_size: K of validation/test samples; 1 (default) gives token
            format in both stages, ``patch_size`` gives patch-format validation.
        eod_mask_loss: zero the loss where the label is EOD (megatron's flag).
        check_token_ids: scan the ``.bin`` files for ids >= the vocabulary.
        is_built_on_rank: megatron-core's callable; default: every rank builds.
        fim: fill-in-the-middle samples in every split, as Megatron-LM's --fim-data
            (``patch_megatron.data.fim``); None: samples as read.

    Returns:
        StageDatasets; ``train`` is indexed from 0 in stream order, so a resumed
        run continues by skipping its consumed samples. Samples are dicts of
        ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (see patch_dataset).

    Raises:
        DatasetFileError (missing/truncated/foreign files, out-of-vocabulary ids),
        DatasetTooSmallError (a split or stage share smaller than one sample),
        ValueError (inconsistent arguments).
    """
    if stage not in (PATCH, TOKEN):
        raise ValueError(f"stage must be {PATCH!r} or {TOKEN!r}, got {stage!r}")
    if not 0.0 <= patch_data_fraction <= 1.0:
        raise ValueError(f"--patch-data-fraction must lie in [0, 1], got {patch_data_fraction}")
    if stage == PATCH and patch_data_fraction == 0.0:
        raise ValueError("the patch stage has no data with --patch-data-fraction 0.")
    if stage == TOKEN and patch_data_fraction == 1.0:
        raise ValueError("the token stage has no data with --patch-data-fraction 1.")
    if seq_length <= 0 or patch_size <= 0 or eval_patch_size <= 0:
        raise ValueError("seq_length, patch_size and eval_patch_size must be positive.")
    prefixes, weights = _parse_blend(data_path)
    if weights is not None and (None in (valid_samples, test_samples) or
                                train_samples is None and train_token_budget is None):
        raise ValueError("a weighted --data-path blend needs sample counts for every split "
                         "(megatron-core draws blended splits by count, not by epoch).")
    if weights is not None and data_cache_path and not torch.distributed.is_initialized():
        raise ValueError("a weighted --data-path blend with a data cache needs "
                         "torch.distributed initialised (megatron-core 0.16's BlendedDataset "
                         "asks for the rank); initialise the process group first.")
    infos = [inspect_prefix(p, tokenizer.vocab_size, check_token_ids) for p in prefixes]

    sample_patch = stage == PATCH and patch_size or 1
    if train_samples is None and train_token_budget is not None:
        train_samples = stage_samples(stage, train_token_budget, patch_data_fraction,
                                      seq_length, patch_size)
    windows = _stream_windows(prefixes, weights, infos, split, patch_data_fraction,
                              train_token_budget, seq_length, patch_size)
    config = PatchGPTDatasetConfig(
        random_seed=seed, sequence_length=raw_sequence_length(seq_length, sample_patch),
        blend=(prefixes, weights), split=split, path_to_cache=data_cache_path,
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss, create_attention_mask=False,
        model_positions=seq_length, patch_size=sample_patch, eval_patch_size=eval_patch_size,
        stage=stage, stream_seed=seed, stream_windows=windows, fim=fim,
        mid_level_dataset_surplus=_BLEND_SURPLUS)
    _check_index_cache_on_rank_0(prefixes, data_cache_path)
    try:
        train, valid, test = BlendedMegatronDatasetBuilder(
            PatchGPTDataset, [train_samples, valid_samples, test_samples],
            is_built_on_rank or (lambda: True), config).build()
    except Exception as error:  # megatron-core re-raises a cache write's OSError as Exception
        cause = error if isinstance(error, OSError) else error.__cause__
        if not isinstance(cause, OSError) or cause.errno not in _CACHE_WRITE_ERRORS:
            raise
        where = data_cache_path or os.path.join(prefixes[0], DEFAULT_CACHE_FOLDER)
        raise DatasetFileError(
            f"cannot write megatron's dataset index cache in {where} "
            f"({cause.strerror or cause}: {cause.filename or where}); pass --data-cache-path "
            f"with a writable folder.") from None
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        record_fingerprints(prefixes, data_cache_path)
    return StageDatasets(train, valid, test, train_samples, windows)


def _check_index_cache_on_rank_0(prefixes, data_cache_path) -> None:
    """Rank 0 checks the cache, every rank learns the verdict.

    megatron-core's builder writes missing cache files on rank 0 while the other ranks
    wait at a barrier, then they read them: a check on another rank before that barrier
    would race rank 0's writes (and see half-written files). Every rank calls this.
    """
    distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    problem = None
    if not distributed or torch.distributed.get_rank() == 0:
        try:
            check_index_cache(prefixes, data_cache_path)
        except DatasetFileError as error:
            problem = str(error)
    if distributed:
        verdict = [problem]
        torch.distributed.broadcast_object_list(verdict, src=0)
        problem = verdict[0]
    if problem is not None:
        raise DatasetFileError(problem)


def _parse_blend(data_path: Sequence[str]):
    if not data_path:
        raise ValueError("--data-path is empty: give PREFIX or W1 P1 W2 P2 ...")
    prefixes, weights = get_blend_from_list(list(data_path))
    if len(prefixes) > 1 and weights is None:
        raise ValueError("several --data-path prefixes need weights: W1 P1 W2 P2 ...")
    if weights is not None and any(w <= 0 for w in weights):
        raise ValueError(f"--data-path weights must be positive, got {weights}")
    return list(prefixes), weights


def _stream_windows(prefixes, weights, infos, split, patch_data_fraction, budget,
                    seq_length, patch_size) -> Dict[str, List[int]]:
    """Each prefix's [patch, token] share of its train stream (see stream_split)."""
    train_range = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))[0]
    shares = [1.0] if weights is None else [w / sum(weights) for w in weights]
    surplus = 0.0 if len(prefixes) == 1 else _BLEND_SURPLUS
    windows = {}
    for prefix, info, share in zip(prefixes, infos, shares):
        train_tokens = _train_tokens(prefix, info, train_range)
        patch_stream = token_stream = None
        if budget is not None:
            patch_samples = math.ceil(share * (1 + surplus) * stage_samples(
                PATCH, budget, patch_data_fraction, seq_length, patch_size))
            token_samples = math.ceil(share * (1 + surplus) * stage_samples(
                TOKEN, budget, patch_data_fraction, seq_length, patch_size))
            patch_stream = stream_tokens_for_samples(
                patch_samples, raw_sequence_length(seq_length, patch_size))
            token_stream = stream_tokens_for_samples(token_samples, seq_length)
        window = window_for_prefix(train_tokens, patch_data_fraction, patch_stream,
                                   token_stream)
        windows[prefix] = [window.patch_tokens, window.token_tokens]
    return windows


def _train_tokens(prefix, info, train_range) -> int:
    if train_range is None:
        return 0
    # The same rounding megatron-core's builder uses to cut the train split.
    begin = int(round(train_range[0] * float(info.sequence_count)))
    end = int(round(train_range[1] * float(info.sequence_count)))
    lengths = numpy.fromfile(prefix + ".idx", dtype=numpy.int32, count=info.sequence_count,
                             offset=34)
    return int(lengths[begin:end].sum(dtype=numpy.int64))
