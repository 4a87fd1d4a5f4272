"""Reading a torch_dist checkpoint without running code from it, and checking its files.

Which files of ``iter_XXXXXXX/`` are unpickled, and by what:

- ``.metadata``: torch.distributed.checkpoint's ``FileSystemReader`` reads it
  with plain ``pickle.load``. ``read_metadata`` unpickles it first with
  ``MetadataUnpickler``, which admits only the classes that metadata is built
  of (``ALLOWED_METADATA_GLOBALS``) and refuses anything else before it is
  called.
- the byte items of ``*.distcp`` (megatron's ShardedObjects, e.g. the
  distributed optimizer's per-bucket state): torch's load planner reads them
  with ``torch.load(weights_only=False)``. ``check_checkpoint`` reads each one
  with ``weights_only=True`` first.
- the tensor items of ``*.distcp``: torch reads them with ``weights_only=True``
  (every torch this project admits, see setup.py).
- ``common.pt``: megatron-core's common strategy calls ``torch.load`` with
  torch's default; ``read_common`` and ``safe_common_strategy()`` (passed to
  ``dist_checkpointing.load``) read it with ``weights_only=True`` whatever
  that default is.

So a loader calls ``check_checkpoint(path)`` before handing ``path`` to
megatron-core, and passes ``safe_common_strategy()`` as its common strategy.

Integrity: ``write_checksums`` records the sha256 of every file of a finished
save in ``checksums.json``; ``verify_checksums`` recomputes them (streamed,
files hashed in parallel threads: hashlib releases the GIL) and names the
first file that differs. Checkpoints written before the manifest existed have
none and are not verified.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import torch

CHECKSUM_FILE = "checksums.json"
METADATA_FILE = ".metadata"
COMMON_FILE = "common.pt"
# A rank's files in Megatron-LM's legacy torch format.
TORCH_FORMAT_FILE = "model_optim_rng.pt"
DISTRIBUTED_OPTIMIZER_FILE = "distrib_optim.pt"
_CHUNK = 4 << 20

# Everything torch.distributed.checkpoint's Metadata pickle refers to (found by
# reading the .metadata of this project's checkpoints, model, Adam and the
# distributed optimizer's byte items). Dtypes are added below.
ALLOWED_METADATA_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.planner", "SavePlan"),
    ("torch.distributed.checkpoint.planner", "WriteItem"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
    ("torch.distributed.checkpoint.planner", "TensorWriteData"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout (torch.strided) by its name
    ("collections", "OrderedDict"),
}) | frozenset(("torch", name) for name in dir(torch)
               if isinstance(getattr(torch, name, None), torch.dtype))


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file that would run code, or is damaged; the message names the file."""


class ForbiddenObjectError(UnsafeCheckpointError):
    """A checkpoint file holding objects that loading must not unpickle (it could run code)."""


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch.distributed.checkpoint metadata and nothing else."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        if (module, name) not in ALLOWED_METADATA_GLOBALS:
            raise ForbiddenObjectError(
                f"{self.source} holds a non-allow-listed object ({module}.{name}), not only "
                "torch.distributed.checkpoint metadata; refusing to unpickle it. Do not load "
                "this checkpoint: it may run code. Use a checkpoint from a trusted source")
        return getattr(importlib.import_module(module), name)


def unpickling_error(source: str, item: str, error: Exception) -> UnsafeCheckpointError:
    """Why a weights_only load of a checkpoint item failed: an object outside the allow-list,
    or numpy arrays pickled under numpy 2 (``numpy._core``), which numpy 1.x cannot import."""
    import numpy

    text = str(error)
    if "numpy._core" in text and int(numpy.__version__.split(".")[0]) < 2:
        return UnsafeCheckpointError(
            f"{source}: item {item} holds numpy arrays saved under numpy 2 (numpy._core), which "
            f"numpy {numpy.__version__} cannot load: install numpy >= 2 to read this checkpoint")
    return ForbiddenObjectError(
        f"{source}: item {item} holds a non-allow-listed object (weights_only load failed: "
        f"{_first_line(error)}); refusing to unpickle it. Do not load this checkpoint: it may "
        "run code")


def read_metadata(path: str):
    """The checkpoint's torch.distributed.checkpoint Metadata, unpickled through the allow-list."""
    from torch.distributed.checkpoint.metadata import Metadata

    source = os.path.join(path, METADATA_FILE)
    try:
        with open(source, "rb") as f:
            metadata = MetadataUnpickler(f, source).load()
    except FileNotFoundError:
        raise UnsafeCheckpointError(f"{source} is missing: the checkpoint is incomplete") from None
    except UnsafeCheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - truncated or garbled pickle, reported with the file
        raise UnsafeCheckpointError(f"{source} cannot be read ({type(error).__name__}: "
                                    f"{_first_line(error)}): the checkpoint is damaged") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{source} holds a {type(metadata).__name__}, not "
                                    "torch.distributed.checkpoint metadata: the checkpoint is damaged")
    return metadata


def read_common(path: str) -> dict:
    """``common.pt`` with ``torch.load(weights_only=True)``, whatever torch's default."""
    source = os.path.join(path, COMMON_FILE)
    if not os.path.isfile(source):
        raise UnsafeCheckpointError(f"{path} has no {COMMON_FILE}: it is incomplete or not a "
                                    "torch_dist checkpoint written by pretrain_patch_gpt.py")
    return read_state_file(source)


def read_state_file(source: str) -> dict:
    """A pickled state dict (``common.pt``, or a rank's file of the legacy ``torch`` format)
    with ``torch.load(weights_only=True)``, whatever torch's default."""
    # megatron-core registers what Megatron-LM's common.pt holds (argparse.Namespace, its enums,
    # numpy arrays) as safe for weights_only loading when it is imported.
    import megatron.core  # noqa: F401

    try:
        common = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ForbiddenObjectError(
            f"{source} holds objects other than tensors and plain data; refusing to unpickle them "
            f"(weights_only load failed: {_first_line(error)})") from None
    except Exception as error:  # noqa: BLE001 - truncated or garbled file
        raise UnsafeCheckpointError(f"{source} cannot be read ({type(error).__name__}: "
                                    f"{_first_line(error)}): the checkpoint is damaged") from None
    if not isinstance(common, dict):
        raise UnsafeCheckpointError(f"{source} holds a {type(common).__name__}, not a dict: "
                                    "the checkpoint is damaged")
    return common


def _data_file(path: str, relative: str) -> str:
    """A shard file named by the metadata; only plain names inside the checkpoint directory."""
    if os.path.basename(relative) != relative or relative in ("", ".", ".."):
        raise ForbiddenObjectError(f"{os.path.join(path, METADATA_FILE)} points at {relative!r}, "
                                    "outside the checkpoint directory: refusing to read it")
    return os.path.join(path, relative)


def check_byte_items(path: str, metadata) -> None:
    """Read every pickled byte item with ``weights_only=True`` before torch unpickles it freely.

    Also refuses shard file names that lead outside the checkpoint directory.
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    byte_keys = {fqn for fqn, md in metadata.state_dict_metadata.items()
                 if isinstance(md, BytesStorageMetadata)}
    storage = getattr(metadata, "storage_data", None) or {}
    for index, info in storage.items():
        source = _data_file(path, info.relative_path)  # tensor items too: no reading elsewhere
        if getattr(index, "fqn", None) not in byte_keys:
            continue
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpointError(f"{source}: item {index.fqn} is stored transformed "
                                        f"({info.transform_descriptors}); only plain items load")
        try:
            with open(source, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
        except OSError as error:
            raise UnsafeCheckpointError(f"{source} cannot be read ({error.strerror}): the "
                                        "checkpoint is incomplete") from None
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise unpickling_error(source, index.fqn, error) from None
        except Exception as error:  # noqa: BLE001
            raise UnsafeCheckpointError(f"{source}: item {index.fqn} cannot be read "
                                        f"({type(error).__name__}): the checkpoint is damaged") from None


def check_checkpoint(path: str) -> dict:
    """Everything megatron-core and torch will unpickle, checked; returns ``common.pt``'s dict
    (of the legacy torch format: the first rank file's, every rank's file read)."""
    rank_dirs = sorted(n for n in os.listdir(path) if n.startswith("mp_rank_"))
    if rank_dirs:
        states = [read_rank_folder(os.path.join(path, d)) for d in rank_dirs]
        return states[0]
    common = read_common(path)
    check_byte_items(path, read_metadata(path))
    return common


def read_rank_folder(folder: str) -> dict:
    """A rank's folder of the legacy torch format, every file checked: its
    ``model_optim_rng.pt`` (returned) and the distributed optimizer's ``distrib_optim.pt``."""
    source = os.path.join(folder, TORCH_FORMAT_FILE)
    if not os.path.isfile(source):
        raise UnsafeCheckpointError(f"{source} is missing: the checkpoint is incomplete")
    state = read_state_file(source)
    optimizer_state = os.path.join(folder, DISTRIBUTED_OPTIMIZER_FILE)
    if os.path.exists(optimizer_state):
        read_state_file(optimizer_state)
    return state


def _common_strategy_class():
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
        """megatron-core's common strategy, reading common.pt with ``weights_only=True``."""

        def load_common(self, checkpoint_dir):
            return read_common(str(checkpoint_dir))

    return SafeCommonLoadStrategy


def safe_common_strategy():
    """A ``SafeCommonLoadStrategy`` (the class is built on first use: importing this module
    must not import megatron-core, see the flag parser)."""
    return _common_strategy_class()()


# ---------------------------------------------------------------------------
# Checksums.

def _sha256(file_path: str) -> str:
    digest = hashlib.sha256()
    with open(file_path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files_of(path: str) -> list[str]:
    """The checkpoint's files, relative to it: torch_dist's lie at the top, the legacy torch
    format's one level down (``mp_rank_00/model_optim_rng.pt``)."""
    names = []
    for top in os.listdir(path):
        if os.path.isfile(os.path.join(path, top)):
            if top != CHECKSUM_FILE:
                names.append(top)
        elif os.path.isdir(os.path.join(path, top)):
            names += [f"{top}/{n}" for n in os.listdir(os.path.join(path, top))
                      if os.path.isfile(os.path.join(path, top, n))]
    return sorted(names)


def _inside(name: str) -> bool:
    """A manifest name that stays inside the checkpoint: a file, or a file one folder down."""
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(p not in ("", ".", "..") and os.path.basename(p) == p
                                        for p in parts)


def _hash_all(path: str, names: list[str]) -> dict:
    workers = max(1, min(8, len(names), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        digests = pool.map(lambda n: _sha256(os.path.join(path, n)), names)
        return dict(zip(names, digests))


def write_checksums(path: str) -> None:
    """Record every file's size and sha256 in ``path/checksums.json`` (after the save finished)."""
    names = _files_of(path)
    digests = _hash_all(path, names)
    manifest = {"algorithm": "sha256",
                "files": {n: {"size": os.path.getsize(os.path.join(path, n)), "sha256": digests[n]}
                          for n in names}}
    tmp = os.path.join(path, CHECKSUM_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, CHECKSUM_FILE))


def first_damaged_file(path: str, part: int = 0, parts: int = 1) -> str | None:
    """A description of the first file that differs from the manifest; None if all match.

    ``part`` of ``parts``: check only every ``parts``-th file from the ``part``-th
    (the ranks of a run share the hashing). A checkpoint without a manifest
    (written before it existed) has nothing to check.
    """
    manifest_path = os.path.join(path, CHECKSUM_FILE)
    if not os.path.exists(manifest_path):
        return None
    try:
        with open(manifest_path, "rb") as f:
            files = json.loads(f.read().decode("utf-8"))["files"]
        expected = {str(n): (int(v["size"]), str(v["sha256"])) for n, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{manifest_path} (not a readable checksum manifest)"
    names = sorted(expected)[part::parts]
    for name in names:
        if not _inside(name):
            return f"{manifest_path} (names a file outside the checkpoint: {name!r})"
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            return f"{file_path} (missing)"
        size = os.path.getsize(file_path)
        if size != expected[name][0]:
            return f"{file_path} (size {size} bytes, saved as {expected[name][0]}: truncated or altered)"
    digests = _hash_all(path, names)
    for name in names:
        if digests[name] != expected[name][1]:
            return f"{os.path.join(path, name)} (sha256 differs from the one saved: altered)"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""
