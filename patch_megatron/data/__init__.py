"""Data pipeline: tokenizers, Megatron-format preprocessing, patch-aware stage datasets.

Public entry points:

* ``build_stage_datasets`` (stage_datasets): train/valid/test for the patch or token stage.
* ``build_tokenizer`` / ``tokenizer_info`` (tokenizers): Megatron-LM's tokenizer flags.
* ``build_builtin_corpus`` (builtin_corpus): a small real corpus from the stdlib.
* ``PreprocessConfig`` (preprocess; run it with ``preprocess.preprocess``: the package
  attribute ``preprocess`` is that submodule), ``merge_prefixes`` (merge): the tools' engines.
* ``inspect_prefix`` (index_validation): checks a data prefix, clear errors.
"""

from patch_megatron.lazy_exports import exports

# Imported on first use (PEP 562): most submodules pull in megatron-core, which
# takes seconds, and the flag parser only needs the tokenizer names.
_HOMES = {
    "build_builtin_corpus": "builtin_corpus", "iter_builtin_documents": "builtin_corpus",
    "DatasetFileError": "index_validation", "inspect_prefix": "index_validation",
    "merge_prefixes": "merge", "PreprocessConfig": "preprocess",
    "DatasetTooSmallError": "patch_dataset", "PatchGPTDataset": "patch_dataset",
    "PatchGPTDatasetConfig": "patch_dataset", "raw_sequence_length": "patch_dataset",
    "StageDatasets": "stage_datasets", "build_stage_datasets": "stage_datasets",
    "TokenizerInfo": "tokenizers", "add_tokenizer_args": "tokenizers", "build_tokenizer": "tokenizers",
    "build_tokenizer_from_args": "tokenizers", "tokenizer_info": "tokenizers",
}

__getattr__ = exports(__name__, _HOMES)

__all__ = [
    "DatasetFileError", "DatasetTooSmallError", "PatchGPTDataset", "PatchGPTDatasetConfig",
    "StageDatasets", "TokenizerInfo", "add_tokenizer_args", "build_builtin_corpus",
    "build_stage_datasets", "build_tokenizer", "build_tokenizer_from_args",
    "inspect_prefix", "iter_builtin_documents", "merge_prefixes",
    "PreprocessConfig", "raw_sequence_length", "tokenizer_info",
]
