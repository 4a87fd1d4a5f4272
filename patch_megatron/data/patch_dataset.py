"""megatron-core's GPTDataset, serving samples of T patches of K tokens.

A GPTDataset built with ``sequence_length = K*T + K - 1`` reads windows of
``K*T + K`` raw tokens. From its sample (``tokens = raw[:-1]``,
``labels = raw[1:]``) this class returns:

* ``tokens``       int64 [K*T]  = raw[:K*T], the model input (T patches)
* ``labels``       int64 [K*T]  = raw[K:],   so ``labels[i*K + k]`` is token k of patch i+1
* ``loss_mask``    float32 [K*T] GPTDataset's mask, aligned with ``labels``
  (0 on padding, and on EOD labels when ``eod_mask_loss``)
* ``position_ids`` int64 [T]    = 0..T-1 (patch positions)

With K = 1 this is exactly GPTDataset's sample of length T. Train splits keep
only the documents their stage owns (``stream_split``); validation and test
splits use ``eval_patch_size`` (1 by default: token format in both stages).
"""

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from patch_megatron.data.fim import FIMConfig, rearrange, sample_generator
from patch_megatron.data.stream_split import TOKEN, StreamWindow, stage_documents

EVAL_STAGE = "eval"


def raw_sequence_length(seq_length: int, patch_size: int) -> int:
    """GPTDataset sequence length whose windows hold K*T + K tokens."""
    return patch_size * seq_length + patch_size - 1


@dataclass
class PatchGPTDatasetConfig(GPTDatasetConfig):
    """GPTDatasetConfig plus the patch layout and the stage's share of the stream.

    ``sequence_length`` must equal ``raw_sequence_length(model_positions, patch_size)``.
    """

    model_positions: int = 0
    """T: positions the model sees (patches in the patch stage, tokens otherwise)."""
    patch_size: int = 1
    """K of the train split's samples."""
    eval_patch_size: int = 1
    """K of the validation/test samples (1: token format)."""
    stage: str = TOKEN
    stream_seed: int = 0
    stream_windows: Optional[Dict[str, List[int]]] = None
    """Per prefix, [patch stream tokens, token stream tokens]; None: no λ split."""
    fim: Optional[FIMConfig] = None
    """Fill-in-the-middle samples (``--fim-data``, patch_megatron.data.fim); None: as read."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reset_position_ids or self.reset_attention_mask:
            raise ValueError("reset_position_ids/reset_attention_mask are not supported with "
                             "patch samples: positions are always patch indices 0..T-1.")
        expected = raw_sequence_length(self.model_positions, self.patch_size)
        if self.model_positions <= 0 or self.sequence_length != expected:
            raise ValueError(f"sequence_length {self.sequence_length} does not hold "
                             f"T={self.model_positions} patches of K={self.patch_size} plus "
                             f"targets; it must be {expected}.")


class PatchGPTDataset(GPTDataset):
    """GPTDataset subclass; see the module docs for the sample layout."""

    def __init__(self, indexed_dataset: IndexedDataset, dataset_path: Optional[str],
                 indexed_indices: numpy.ndarray, num_samples: Optional[int],
                 index_split: Split, config: PatchGPTDatasetConfig) -> None:
        if index_split == Split.train:
            indexed_indices = self._stage_indices(indexed_dataset, dataset_path,
                                                  indexed_indices, config)
        else:
            config = _eval_config(config)
        _require_one_sample(indexed_dataset, dataset_path, indexed_indices, index_split, config)
        self.stage_document_indices = indexed_indices
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples,
                         index_split, config)

    @staticmethod
    def _key_config_attributes() -> List[str]:
        # Cached indices must differ whenever the stage, layout or split differs.
        return GPTDataset._key_config_attributes() + [
            "model_positions", "patch_size", "stage", "stream_seed", "stream_windows"]

    @staticmethod
    def _stage_indices(indexed_dataset, dataset_path, indexed_indices, config):
        if config.stream_windows is None:
            return indexed_indices
        if dataset_path not in config.stream_windows:
            raise KeyError(f"no stream window for data prefix {dataset_path!r}")
        patch_tokens, token_tokens = config.stream_windows[dataset_path]
        lengths = indexed_dataset.sequence_lengths[indexed_indices]
        return stage_documents(indexed_indices, lengths,
                               StreamWindow(patch_tokens, token_tokens), config.stage,
                               config.stream_seed)

    def _query_document_sample_shuffle_indices(self, idx: int):
        window, documents = super()._query_document_sample_shuffle_indices(idx)
        if self.config.fim is not None:
            rng = sample_generator(self.config.random_seed, self.unique_description_hash, idx)
            window = rearrange(window, self.config.fim, self.config.tokenizer, rng)
        return window, documents

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        sample = super().__getitem__(idx)
        k, t = self.config.patch_size, self.config.model_positions
        return {
            "tokens": sample["tokens"][:k * t].contiguous(),
            "labels": sample["labels"][k - 1:].contiguous(),
            "loss_mask": sample["loss_mask"][k - 1:].to(torch.float32).contiguous(),
            "position_ids": torch.arange(t, dtype=torch.int64),
        }


class DatasetTooSmallError(ValueError):
    """A split (or a stage's share of it) holds fewer tokens than one sample."""


def _require_one_sample(indexed_dataset, dataset_path, indices, index_split, config) -> None:
    # GPTDataset would loop forever on an empty split and build samples out of
    # one document repeated on a tiny one; both are configuration mistakes.
    tokens = int(indexed_dataset.sequence_lengths[indices].sum(dtype=numpy.int64))
    needed = config.sequence_length + 1
    if tokens >= needed:
        return
    where = (f"the {config.stage} stage's share of the train split"
             if index_split == Split.train and config.stream_windows is not None
             else f"the {index_split.name} split")
    raise DatasetTooSmallError(
        f"{dataset_path}: {where} holds {tokens} tokens in {len(indices)} documents, fewer "
        f"than one sample needs ({needed} = K*T+K with T={config.model_positions}, "
        f"K={config.patch_size}). Use more data, a smaller --seq-length, or change --split "
        f"/ --patch-data-fraction so this split gets more documents.")


def _eval_config(config: PatchGPTDatasetConfig) -> PatchGPTDatasetConfig:
    """The same config with the evaluation patch size and no stage split.

    A shallow copy with fields set directly: re-running __post_init__ would
    re-normalise the blend and split it was already built from.
    """
    evaluation = copy.copy(config)
    evaluation.patch_size = config.eval_patch_size
    evaluation.sequence_length = raw_sequence_length(config.model_positions,
                                                     config.eval_patch_size)
    evaluation.stage = EVAL_STAGE
    evaluation.stream_windows = None
    return evaluation
