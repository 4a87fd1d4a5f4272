"""Data pipeline: tokenizers, Megatron-format preprocessing, patch-aware stage datasets.

Modules (import from them directly):

* ``stage_datasets``: train/valid/test for the patch or token stage (``build_stage_datasets``).
* ``tokenizers``: Megatron-LM's tokenizer flags (``build_tokenizer``, ``tokenizer_info``).
* ``builtin_corpus``: a small real corpus from the standard library.
* ``preprocess`` and ``merge``: the engines of ``tools/preprocess_data.py`` and
  ``tools/merge_datasets.py``.
* ``index_validation``: checks a data prefix, with clear errors.
"""
