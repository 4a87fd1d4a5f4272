"""Check a megatron data prefix before training reads it, with errors that say the fix.

megatron-core's readers assume well-formed files (a truncated index or a short
``.bin`` fails deep inside numpy, or silently reads garbage). These checks
follow the documented ``.idx`` layout::

    9 bytes  magic b"MMIDIDX\\x00\\x00"
    8 bytes  version, little-endian uint64, = 1
    1 byte   dtype code (megatron-core DType: 8 = uint16, 4 = int32, ...)
    8 bytes  sequence count S;   8 bytes document count D (entries, = documents + 1)
    S * int32 sequence lengths;  S * int64 byte pointers;  D * int64 document indices
"""

import os
import struct
from dataclasses import dataclass
from typing import Optional

import numpy
from megatron.core.datasets.indexed_dataset import DType

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = len(INDEX_MAGIC) + 8 + 1 + 8 + 8
_SCAN_CHUNK = 1 << 26  # tokens per chunk when scanning for out-of-vocabulary ids
_POINTER_CHUNK = 1 << 22  # sequences per chunk when checking the pointer table


class DatasetFileError(ValueError):
    """A data prefix whose files cannot be used as they are."""


@dataclass(frozen=True)
class PrefixInfo:
    prefix: str
    dtype: type
    sequence_count: int
    document_count: int
    tokens: int
    max_token_id: Optional[int]


def inspect_prefix(prefix: str, vocab_size: Optional[int] = None,
                   check_token_ids: bool = True) -> PrefixInfo:
    """Validate ``prefix.idx`` and ``prefix.bin``; return their sizes.

    With ``vocab_size`` and ``check_token_ids`` the ``.bin`` is scanned (about a
    second per GB) and any id >= ``vocab_size`` is an error.
    """
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    made_by = "Make it with tools/preprocess_data.py"
    if not os.path.isfile(idx_path):
        hint = " (pass the prefix without .bin/.idx)" if prefix.endswith((".bin", ".idx")) else ""
        raise DatasetFileError(f"{idx_path}: index file not found{hint}. A data prefix names "
                               f"PREFIX.bin and PREFIX.idx. {made_by}.")
    if not os.path.isfile(bin_path):
        raise DatasetFileError(f"{bin_path}: data file not found next to its index. {made_by}.")
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as stream:
        header = stream.read(HEADER_BYTES)
    if len(header) < len(INDEX_MAGIC) or header[:len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise DatasetFileError(f"{idx_path}: wrong magic bytes, not a megatron indexed-dataset "
                               f"index. {made_by}.")
    if len(header) < HEADER_BYTES:
        raise DatasetFileError(f"{idx_path}: truncated index ({idx_size} bytes, the header alone "
                               f"is {HEADER_BYTES}); re-run preprocessing.")
    version, = struct.unpack_from("<Q", header, len(INDEX_MAGIC))
    if version != INDEX_VERSION:
        raise DatasetFileError(f"{idx_path}: index version {version}, only version "
                               f"{INDEX_VERSION} is supported. {made_by}.")
    code = header[len(INDEX_MAGIC) + 8]
    try:
        dtype = DType.dtype_from_code(code)
    except ValueError:
        raise DatasetFileError(f"{idx_path}: unknown token dtype code {code}; the index is "
                               f"damaged. {made_by}.") from None
    sequences, documents = struct.unpack_from("<QQ", header, len(INDEX_MAGIC) + 9)
    expected = HEADER_BYTES + sequences * (4 + 8) + documents * 8
    if idx_size < expected:
        raise DatasetFileError(f"{idx_path}: truncated index ({idx_size} bytes, {expected} "
                               f"expected for {sequences} sequences); re-run preprocessing.")
    if idx_size > expected:
        raise DatasetFileError(f"{idx_path}: {idx_size - expected} unexpected bytes after the "
                               f"index (multimodal or damaged); re-run preprocessing.")
    lengths = numpy.fromfile(idx_path, dtype=numpy.int32, count=sequences, offset=HEADER_BYTES)
    doc_indices = numpy.fromfile(idx_path, dtype=numpy.int64, count=documents,
                                 offset=HEADER_BYTES + sequences * 12)
    if documents == 0 or doc_indices[0] != 0 or doc_indices[-1] != sequences or \
            numpy.any(numpy.diff(doc_indices) < 0) or numpy.any(lengths < 0):
        raise DatasetFileError(f"{idx_path}: inconsistent document table; the index is "
                               f"damaged. {made_by}.")
    tokens = int(lengths.sum(dtype=numpy.int64))
    itemsize = numpy.dtype(dtype).itemsize
    _check_pointers(idx_path, lengths, itemsize)
    bin_size = os.path.getsize(bin_path)
    if bin_size != tokens * itemsize:
        raise DatasetFileError(
            f"{bin_path}: {bin_size} bytes, but its index describes {tokens} tokens of "
            f"{itemsize} bytes ({tokens * itemsize} bytes); the pair does not belong together "
            f"or a write was cut short. Re-run preprocessing.")
    max_id = None
    if check_token_ids and tokens:
        max_id = _max_token_id(bin_path, dtype, tokens)
        if vocab_size is not None and max_id >= vocab_size:
            raise DatasetFileError(
                f"{bin_path}: token id {max_id} >= the tokenizer's vocabulary size "
                f"{vocab_size}; the data was made with another tokenizer. Preprocess it with "
                f"the tokenizer you train with.")
    return PrefixInfo(prefix, dtype, int(sequences), int(documents) - 1, tokens, max_id)


def _check_pointers(idx_path: str, lengths: numpy.ndarray, itemsize: int) -> None:
    """Sequence i starts where sequence i-1 ends: pointers are the running byte offsets.

    megatron-core reads sequence i at ``pointers[i]`` without checking, so a damaged
    pointer silently shifts token boundaries.
    """
    start_byte = 0
    for first in range(0, len(lengths), _POINTER_CHUNK):
        chunk = lengths[first:first + _POINTER_CHUNK].astype(numpy.int64) * itemsize
        pointers = numpy.fromfile(idx_path, dtype=numpy.int64, count=len(chunk),
                                  offset=HEADER_BYTES + len(lengths) * 4 + first * 8)
        expected = start_byte + numpy.cumsum(chunk) - chunk
        wrong = numpy.flatnonzero(pointers != expected)
        if len(wrong):
            at = int(wrong[0])
            raise DatasetFileError(
                f"{idx_path}: damaged pointer table: sequence {first + at} starts at byte "
                f"{int(pointers[at])}, but the sequence lengths put it at byte "
                f"{int(expected[at])}. Re-run preprocessing (tools/preprocess_data.py) to "
                f"rewrite the .bin/.idx pair.")
        start_byte += int(chunk.sum())


def _max_token_id(bin_path: str, dtype: type, tokens: int) -> int:
    data = numpy.memmap(bin_path, dtype=dtype, mode="r", shape=(tokens,))
    try:
        return max(int(data[start:start + _SCAN_CHUNK].max())
                   for start in range(0, tokens, _SCAN_CHUNK))
    finally:
        del data
