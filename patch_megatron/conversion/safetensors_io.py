"""Hugging Face weight files: safetensors, one file or shards with an index.

Layout (transformers' convention): ``model.safetensors`` when everything fits
under the shard limit, otherwise ``model-00001-of-0000N.safetensors`` files
plus ``model.safetensors.index.json`` mapping each tensor name to its file.
"""

from __future__ import annotations

import json
import os
import re

import torch

from patch_megatron.conversion.errors import ConversionError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    match = _SIZE.match(str(text))
    unit = match.group(2).upper() if match else None
    if unit is not None and unit and not unit.endswith("B"):
        unit += "B"
    if not match or unit not in _UNITS:
        raise ConversionError(f"shard size {text!r} is not a size: write e.g. 5GB, 500MB or 2GiB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConversionError(f"shard size {text!r} must be positive")
    return size


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(tensors: dict, max_shard_bytes: int) -> list[list[str]]:
    """Names grouped into shards in order, each under the limit unless one tensor alone is larger."""
    shards, current, size = [], [], 0
    for name, tensor in tensors.items():
        n = _nbytes(tensor)
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    if current:
        shards.append(current)
    return shards


def write_weights(directory: str, tensors: dict, max_shard_bytes: int) -> list[str]:
    """Write the tensors as safetensors file(s); returns the file names written."""
    from safetensors.torch import save_file

    shards = plan_shards(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(tensors, os.path.join(directory, SINGLE_FILE), metadata=metadata)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        save_file({n: tensors[n] for n in shard}, os.path.join(directory, file_name),
                  metadata=metadata)
        weight_map.update({n: file_name for n in shard})
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return names + [INDEX_FILE]


def read_weights(directory: str) -> dict:
    """All tensors of a Hugging Face model directory (safetensors, single or sharded)."""
    from safetensors.torch import load_file

    single, index = os.path.join(directory, SINGLE_FILE), os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(single):
        files = [SINGLE_FILE]
    else:
        raise ConversionError(
            f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}: only safetensors weights are "
            "read (re-save the model with save_pretrained(..., safe_serialization=True))")
    tensors = {}
    for file_name in files:
        path = os.path.join(directory, file_name)
        if not os.path.isfile(path):
            raise ConversionError(f"{INDEX_FILE} names {file_name}, which is missing from "
                                  f"{directory}: the download is incomplete")
        tensors.update(load_file(path))
    return tensors
