"""Data pipeline: tokenizers, Megatron-format preprocessing, patch-aware stage datasets.

Public entry points:

* ``build_stage_datasets`` (stage_datasets): train/valid/test for the patch or token stage.
* ``build_tokenizer`` / ``tokenizer_info`` (tokenizers): Megatron-LM's tokenizer flags.
* ``build_builtin_corpus`` (builtin_corpus): a small real corpus from the stdlib.
* ``preprocess`` (preprocess), ``merge_prefixes`` (merge): the tools' engines.
* ``inspect_prefix`` (index_validation): checks a data prefix, clear errors.
"""

from patch_megatron.data.builtin_corpus import build_builtin_corpus, iter_builtin_documents
from patch_megatron.data.index_validation import DatasetFileError, inspect_prefix
from patch_megatron.data.merge import merge_prefixes
from patch_megatron.data.preprocess import PreprocessConfig, preprocess
from patch_megatron.data.patch_dataset import (
    DatasetTooSmallError, PatchGPTDataset, PatchGPTDatasetConfig, raw_sequence_length)
from patch_megatron.data.stage_datasets import StageDatasets, build_stage_datasets
from patch_megatron.data.tokenizers import (
    TokenizerInfo, add_tokenizer_args, build_tokenizer, build_tokenizer_from_args,
    tokenizer_info)

__all__ = [
    "DatasetFileError", "DatasetTooSmallError", "PatchGPTDataset", "PatchGPTDatasetConfig",
    "StageDatasets", "TokenizerInfo", "add_tokenizer_args", "build_builtin_corpus",
    "build_stage_datasets", "build_tokenizer", "build_tokenizer_from_args",
    "inspect_prefix", "iter_builtin_documents", "merge_prefixes", "preprocess",
    "PreprocessConfig", "raw_sequence_length", "tokenizer_info",
]
