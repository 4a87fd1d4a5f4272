"""Clear errors for broken data prefixes."""

import shutil
import struct

import pytest

from patch_megatron.data.index_validation import DatasetFileError, inspect_prefix


@pytest.fixture
def prefix_copy(builtin_data_prefix, tmp_path):
    for suffix in (".bin", ".idx"):
        shutil.copy(builtin_data_prefix + suffix, tmp_path / f"c{suffix}")
    return str(tmp_path / "c")


def test_good_prefix_reports_sizes(prefix_copy, sp_tokenizer):
    info = inspect_prefix(prefix_copy, sp_tokenizer.vocab_size)
    assert info.document_count == info.sequence_count > 100
    assert 0 < info.max_token_id < sp_tokenizer.vocab_size


def test_missing_idx(prefix_copy):
    with pytest.raises(DatasetFileError, match=r"index file not found.*without \.bin/\.idx"):
        inspect_prefix(prefix_copy + ".bin")


def test_truncated_idx(prefix_copy):
    data = open(prefix_copy + ".idx", "rb").read()
    open(prefix_copy + ".idx", "wb").write(data[:-5])
    with pytest.raises(DatasetFileError, match="truncated index"):
        inspect_prefix(prefix_copy)
    open(prefix_copy + ".idx", "wb").write(data[:20])
    with pytest.raises(DatasetFileError, match="truncated index"):
        inspect_prefix(prefix_copy)


def test_wrong_magic_and_version(prefix_copy):
    data = bytearray(open(prefix_copy + ".idx", "rb").read())
    open(prefix_copy + ".idx", "wb").write(b"NOTANIDX!" + data[9:])
    with pytest.raises(DatasetFileError, match="wrong magic"):
        inspect_prefix(prefix_copy)
    data[9:17] = struct.pack("<Q", 2)
    open(prefix_copy + ".idx", "wb").write(bytes(data))
    with pytest.raises(DatasetFileError, match="version 2"):
        inspect_prefix(prefix_copy)


def test_bin_size_inconsistent_with_index(prefix_copy):
    with open(prefix_copy + ".bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(DatasetFileError, match="does not belong together"):
        inspect_prefix(prefix_copy)


def test_token_id_beyond_vocabulary(prefix_copy, sp_tokenizer):
    with open(prefix_copy + ".bin", "r+b") as f:
        f.seek(10)
        f.write(struct.pack("<H", 5000))
    with pytest.raises(DatasetFileError, match="token id 5000 >= .* 1024"):
        inspect_prefix(prefix_copy, sp_tokenizer.vocab_size)


@pytest.mark.parametrize("chunk", [None, 7])  # 7: the table is checked in several chunks
@pytest.mark.parametrize("sequence, bit", [(3, 0x10), (0, 0x02), (10, 0x01), (-1, 0x80)])
def test_flipped_bit_in_pointer_table(prefix_copy, monkeypatch, sequence, bit, chunk):
    from patch_megatron.data import index_validation

    if chunk:
        monkeypatch.setattr(index_validation, "_POINTER_CHUNK", chunk)
        inspect_prefix(prefix_copy)  # the good table passes in chunks too
    data = bytearray(open(prefix_copy + ".idx", "rb").read())
    count, = struct.unpack_from("<Q", data, 18)
    at = 34 + count * 4 + (sequence % count) * 8  # low byte of that sequence's pointer
    data[at] ^= bit
    open(prefix_copy + ".idx", "wb").write(bytes(data))
    with pytest.raises(DatasetFileError, match=r"c\.idx: damaged pointer table: sequence "
                                               rf"{sequence % count} .*Re-run preprocessing"):
        inspect_prefix(prefix_copy)
