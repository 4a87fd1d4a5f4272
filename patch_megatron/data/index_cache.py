"""Guard megatron-core's dataset index cache before megatron reads it.

megatron-core caches each dataset's document/sample/shuffle indices as ``.npy``
files (``--data-cache-path``, or by default ``PREFIX/cache/PatchGPTDataset_indices``)
and reads them back with ``numpy.load(..., allow_pickle=True)``: a planted pickle
there runs code. The cache's names hash the configuration and the prefix's
path, not the files' content, so a prefix preprocessed again keeps a cache of
the old documents. Two checks, before megatron opens a cache file:

* every cached ``.npy`` is a plain numeric array, read from its header with
  ``numpy.lib.format`` (nothing is unpickled);
* each prefix's ``.bin``/``.idx`` match the fingerprint (sizes and a hash of the
  ``.idx``) recorded in ``data-fingerprints.json`` next to the cache when the
  cache was first used with them.
"""

import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy

from patch_megatron.data.index_validation import DatasetFileError

DEFAULT_CACHE_FOLDER = os.path.join("cache", "PatchGPTDataset_indices")
FINGERPRINTS = "data-fingerprints.json"
_HASH_CHUNK = 1 << 24


def cache_folders(prefixes: Sequence[str], data_cache_path: Optional[str]) -> Dict[str, List[str]]:
    """Cache folder -> the prefixes whose indices megatron-core keeps there."""
    if data_cache_path:
        return {data_cache_path: list(prefixes)}
    folders: Dict[str, List[str]] = {}
    for prefix in prefixes:  # megatron-core's default: a folder named after the prefix
        folders.setdefault(os.path.join(prefix, DEFAULT_CACHE_FOLDER), []).append(prefix)
    return folders


def check_index_cache(prefixes: Sequence[str], data_cache_path: Optional[str]) -> None:
    """Refuse a cache megatron-core must not read; raises DatasetFileError."""
    for folder, users in cache_folders(prefixes, data_cache_path).items():
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name.endswith(".npy"):
                _check_plain_array(os.path.join(folder, name), folder)
        recorded = _read_fingerprints(folder)
        for prefix in users:
            want = recorded.get(_key(prefix))
            if want is not None and want != fingerprint(prefix):
                raise DatasetFileError(
                    f"{folder}: megatron's index cache was built from other contents of "
                    f"{prefix}.bin/.idx (the files changed since, e.g. preprocessed again); "
                    f"delete the folder {folder} so that it is rebuilt, or pass another "
                    f"--data-cache-path.")


def record_fingerprints(prefixes: Sequence[str], data_cache_path: Optional[str]) -> None:
    """Record the files each cache was built from (after megatron-core wrote it)."""
    for folder, users in cache_folders(prefixes, data_cache_path).items():
        if not os.path.isdir(folder):
            continue
        recorded = _read_fingerprints(folder)
        missing = {_key(p): fingerprint(p) for p in users if _key(p) not in recorded}
        if not missing:
            continue
        recorded.update(missing)
        path = os.path.join(folder, FINGERPRINTS)
        temporary = f"{path}.tmp{os.getpid()}"
        try:
            with open(temporary, "w", encoding="utf-8") as out:
                json.dump(recorded, out, indent=1, sort_keys=True)
            os.replace(temporary, path)
        except OSError:  # a read-only cache that was complete: nothing to record
            if os.path.exists(temporary):
                os.remove(temporary)


def fingerprint(prefix: str) -> Dict[str, object]:
    digest = hashlib.sha256()
    with open(prefix + ".idx", "rb") as index:
        for chunk in iter(lambda: index.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return {"bin_bytes": os.path.getsize(prefix + ".bin"),
            "idx_bytes": os.path.getsize(prefix + ".idx"), "idx_sha256": digest.hexdigest()}


def _key(prefix: str) -> str:
    return os.path.realpath(prefix)


def _read_fingerprints(folder: str) -> Dict[str, dict]:
    path = os.path.join(folder, FINGERPRINTS)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as stream:
            recorded = json.load(stream)
    except (OSError, ValueError):
        recorded = None
    if not isinstance(recorded, dict):
        raise DatasetFileError(f"{path}: unreadable record of the data the index cache was "
                               f"built from; delete the folder {folder} so that it is rebuilt.")
    return recorded


def _check_plain_array(path: str, folder: str) -> None:
    fix = f"delete the folder {folder} so that megatron rebuilds its index cache"
    try:
        with open(path, "rb") as stream:
            version = numpy.lib.format.read_magic(stream)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"format version {version}, megatron writes 1.0")
            if version == (1, 0):
                shape, _, dtype = numpy.lib.format.read_array_header_1_0(stream)
            else:
                shape, _, dtype = numpy.lib.format.read_array_header_2_0(stream)
            header_end = stream.tell()
    except (ValueError, OSError, SyntaxError) as error:
        raise DatasetFileError(f"{path}: not a numpy .npy array ({error}); megatron would "
                               f"unpickle it. Do not train on it: {fix}.") from None
    if dtype.hasobject or dtype.kind not in "iuf":
        raise DatasetFileError(f"{path}: holds {dtype} entries, not plain numbers (megatron "
                               f"would unpickle them). Do not train on it: {fix}.")
    expected = header_end + int(numpy.prod(shape, dtype=numpy.int64)) * dtype.itemsize
    if os.path.getsize(path) != expected:
        raise DatasetFileError(f"{path}: {os.path.getsize(path)} bytes, its header describes "
                               f"{expected}; the cache file is damaged: {fix}.")
