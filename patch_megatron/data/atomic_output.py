"""Write a megatron ``.bin/.idx`` pair so that it exists complete or not at all.

The pair is built under temporary names (``PREFIX.bin.partial``,
``PREFIX.idx.partial``) that megatron-core never opens, and renamed at the end:
first any old ``.idx`` is removed, then the ``.bin`` is renamed, then the
``.idx``. A run stopped at any point therefore leaves either the previous
complete pair, nothing, or a lone ``.bin`` without an index, which every reader
rejects; never a pair that looks complete and is not.
"""

import os
from typing import Sequence

import numpy
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

PARTIAL_SUFFIX = ".partial"


class AtomicIndexedOutput:
    """megatron-core's ``IndexedDatasetBuilder`` writing under temporary names."""

    def __init__(self, prefix: str, dtype: type) -> None:
        self.prefix = prefix
        self.bin_path, self.idx_path = prefix + ".bin", prefix + ".idx"
        self._partial_bin = self.bin_path + PARTIAL_SUFFIX
        self._partial_idx = self.idx_path + PARTIAL_SUFFIX
        directory = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(directory, exist_ok=True)
        self.builder = IndexedDatasetBuilder(self._partial_bin, dtype=dtype)
        self._finalized = False

    def add_document(self, tokens: numpy.ndarray, sequence_lengths: Sequence[int]) -> None:
        self.builder.add_document(tokens, list(sequence_lengths))

    def add_index(self, prefix: str) -> None:
        self.builder.add_index(prefix)

    def finalize(self) -> None:
        """Write the index under its temporary name (the data file is closed)."""
        self.builder.finalize(self._partial_idx)
        self._finalized = True

    def publish(self) -> None:
        """Move the finished pair to its real names."""
        if not self._finalized:
            raise RuntimeError("finalize() the output before publishing it")
        if os.path.exists(self.idx_path):
            os.remove(self.idx_path)
        os.replace(self._partial_bin, self.bin_path)
        os.replace(self._partial_idx, self.idx_path)

    def discard(self) -> None:
        """Drop the temporary files (after an error or interruption)."""
        if not self.builder.data_file.closed:
            self.builder.data_file.close()
        for path in (self._partial_bin, self._partial_idx):
            if os.path.exists(path):
                os.remove(path)
