"""Hostile and broken checkpoints: nothing read runs code, damage is named, no tracebacks.

One tiny run saves iterations 2 and 4 (one launch); each case damages a copy.
A planted pickle is harmless: its ``__reduce__`` touches a marker file and
returns the real object, so a load that unpickled it would go on and succeed.
"""

import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from repo_tools import IN_PROCESS_READING, REPO_ROOT, child_environment, load_tool
from patch_megatron.training import checkpointing, safe_load
from patch_megatron.llama_recipe import RECIPE_FLAGS

FLAGS = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 8 "
    "--micro-batch-size 2 --global-batch-size 4 --mock-data --vocab-size 128 "
    "--make-vocab-size-divisible-by 64 --untie-embeddings-and-output-weights "
    "--patch-size 4 --patch-data-fraction 0.667 --lr 3e-3 --lr-warmup-iters 1 "
    "--log-interval 1 --eval-iters 0 --cpu"
).split() + list(RECIPE_FLAGS) + list(IN_PROCESS_READING)


class Planted:
    """Pickles as a call that touches ``marker`` and then returns ``real``."""

    def __init__(self, real, marker):
        self.real, self.marker = real, str(marker)

    def __reduce__(self):
        return (eval, ("__import__('pathlib').Path(m).touch() or real",
                       {"m": self.marker, "real": self.real}))


def environment():
    return child_environment()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    save = str(tmp_path_factory.mktemp("hostile") / "ckpt")
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "pretrain_patch_gpt.py"), *FLAGS,
                             "--train-iters", "4", "--save-interval", "2", "--save", save],
                            capture_output=True, text=True, env=environment(), timeout=240,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return save


def copy(saved, target):
    shutil.copytree(saved, target)
    return str(target)


def plant_in_metadata(iteration_path, marker):
    path = os.path.join(iteration_path, ".metadata")
    with open(path, "rb") as f:
        real = pickle.load(f)  # our own, just saved
    with open(path, "wb") as f:
        pickle.dump(Planted(real, marker), f)
    safe_load.write_checksums(iteration_path)  # a planted file can come with a matching manifest


def flip_a_bit(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))


# ---------------------------------------------------------------------------
# The safe readers, on a real checkpoint.

def test_a_real_checkpoint_passes_the_allow_list_and_its_checksums(saved):
    path = checkpointing.iteration_dir(saved, 4)
    metadata = safe_load.read_metadata(path)
    assert type(metadata).__name__ == "Metadata" and metadata.state_dict_metadata
    assert safe_load.check_checkpoint(path)["iteration"] == 4
    assert safe_load.first_damaged_file(path) is None
    manifest = json.load(open(os.path.join(path, safe_load.CHECKSUM_FILE)))
    assert {".metadata", "common.pt", "metadata.json"} <= set(manifest["files"])
    assert any(n.endswith(".distcp") for n in manifest["files"])


def test_a_pickle_planted_in_metadata_is_refused_without_running(saved, tmp_path):
    path = checkpointing.iteration_dir(copy(saved, tmp_path / "c"), 4)
    marker = tmp_path / "ran"
    plant_in_metadata(path, marker)
    with pytest.raises(safe_load.ForbiddenObjectError, match=r"\.metadata holds a non-allow-listed "
                                                             r"object \(builtins\.eval\)"):
        safe_load.read_metadata(path)
    assert not marker.exists()


def test_a_pickled_byte_item_is_read_with_weights_only(saved, tmp_path):
    """The distributed optimizer's byte items: torch itself would unpickle them freely."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    path = checkpointing.iteration_dir(copy(saved, tmp_path / "c"), 4)
    marker = tmp_path / "ran"
    buffer = io.BytesIO()
    torch.save(Planted({"step": 1}, marker), buffer)
    with open(os.path.join(path, "__9_0.distcp"), "wb") as f:
        f.write(buffer.getvalue())
    metadata = safe_load.read_metadata(path)
    metadata.state_dict_metadata["optimizer.planted"] = BytesStorageMetadata()
    metadata.storage_data[MetadataIndex("optimizer.planted")] = _StorageInfo(
        "__9_0.distcp", 0, len(buffer.getvalue()))
    with pytest.raises(safe_load.ForbiddenObjectError, match="optimizer.planted holds a non-allow-listed"):
        safe_load.check_byte_items(path, metadata)
    assert not marker.exists()
    # A byte item may not point outside the checkpoint directory.
    metadata.storage_data[MetadataIndex("optimizer.planted")] = _StorageInfo("../x.distcp", 0, 1)
    with pytest.raises(safe_load.ForbiddenObjectError, match="outside the checkpoint directory"):
        safe_load.check_byte_items(path, metadata)


def test_common_pt_is_read_with_weights_only_by_megatrons_loader_too(saved, tmp_path):
    path = checkpointing.iteration_dir(copy(saved, tmp_path / "c"), 4)
    marker = tmp_path / "ran"
    common = os.path.join(path, "common.pt")
    state = torch.load(common, weights_only=True)
    state["planted"] = Planted(1, marker)
    torch.save(state, common)
    with pytest.raises(safe_load.ForbiddenObjectError, match="common.pt holds objects other than"):
        safe_load.safe_common_strategy().load_common(path)
    assert not marker.exists()


def test_checksums_name_the_first_damaged_file(tmp_path):
    for name, data in (("a.distcp", b"a" * 5000), ("b.distcp", b"b" * 5000), (".metadata", b"m")):
        (tmp_path / name).write_bytes(data)
    assert safe_load.first_damaged_file(str(tmp_path)) is None  # no manifest: an old checkpoint
    safe_load.write_checksums(str(tmp_path))
    assert safe_load.first_damaged_file(str(tmp_path)) is None
    flip_a_bit(tmp_path / "b.distcp")
    assert safe_load.first_damaged_file(str(tmp_path)) == \
        f"{tmp_path / 'b.distcp'} (sha256 differs from the one saved: altered)"
    (tmp_path / "a.distcp").write_bytes(b"a" * 100)
    assert "a.distcp (size 100 bytes, saved as 5000" in safe_load.first_damaged_file(str(tmp_path))
    os.remove(tmp_path / ".metadata")
    assert safe_load.first_damaged_file(str(tmp_path)) == f"{tmp_path / '.metadata'} (missing)"
    (tmp_path / safe_load.CHECKSUM_FILE).write_bytes(b"\xff not json")
    assert "not a readable checksum manifest" in safe_load.first_damaged_file(str(tmp_path))


# ---------------------------------------------------------------------------
# The tracker file and the vocabulary.

def test_a_tracker_file_that_is_not_text_is_named(saved, tmp_path):
    ckpt = copy(saved, tmp_path / "c")
    with open(os.path.join(ckpt, checkpointing.LATEST_FILE), "wb") as f:
        f.write(b"\xff\xfe4")
    with pytest.raises(checkpointing.CheckpointError) as error:
        checkpointing.read_latest_iteration(ckpt)
    assert "is not text" in str(error.value) and "iterations saved there: 2, 4" in str(error.value)


def test_a_deleted_tracker_file_is_named_with_the_iterations_to_pick(saved, tmp_path):
    from patch_megatron.conversion.errors import ConversionError
    from patch_megatron.conversion.megatron_checkpoint import checkpoint_directory

    ckpt = copy(saved, tmp_path / "c")
    os.remove(os.path.join(ckpt, checkpointing.LATEST_FILE))
    with pytest.raises(checkpointing.CheckpointError) as error:
        checkpointing.load_checkpoint(ckpt, None, None, None, None, None, None)
    message = str(error.value)
    assert "tracker file latest_checkpointed_iteration.txt is missing" in message
    assert "iterations saved there: 2, 4" in message and "echo 4 >" in message
    with pytest.raises(ConversionError) as error:
        checkpoint_directory(ckpt)
    assert "is missing" in str(error.value) and "--iteration 4" in str(error.value)


def test_another_vocabulary_is_not_blamed_on_the_padding():
    class Args:
        vocab_size, tokenizer_model = 200, None
        make_vocab_size_divisible_by, tensor_model_parallel_size = 64, 1

    saved = {"vocab_size": 128, "tokenizer_model": None, "make_vocab_size_divisible_by": 64,
             "tensor_model_parallel_size": 1}
    hint = checkpointing._vocabulary_hint(saved, Args)
    assert "the vocabulary sizes differ" in hint and "128 tokens, this run has 200" in hint
    assert "tokenizer may differ" in hint and "make-vocab-size-divisible-by" not in hint
    Args.vocab_size = 128
    padded = checkpointing._vocabulary_hint(dict(saved, make_vocab_size_divisible_by=128), Args)
    assert "padded differently" in padded and "--make-vocab-size-divisible-by" in padded


# ---------------------------------------------------------------------------
# The converters refuse before megatron-core reads anything.

@pytest.mark.parametrize("tool", ["convert_to_hf", "convert_patch_to_token"])
def test_converters_refuse_a_planted_metadata_pickle(saved, tmp_path, tool):
    ckpt = copy(saved, tmp_path / "c")
    marker = tmp_path / "ran"
    plant_in_metadata(checkpointing.iteration_dir(ckpt, 4), marker)
    out = (["--output", str(tmp_path / "hf"), "--allow-patch-stage"] if tool == "convert_to_hf"
           else ["--save", str(tmp_path / "t")])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = load_tool(tool).main(["--load", ckpt, *out])
    assert code == 2 and not marker.exists()
    assert "holds a non-allow-listed object (builtins.eval)" in err.getvalue()
    assert "iteration 2" in err.getvalue() and "--iteration 2" in err.getvalue()
    assert "Traceback" not in err.getvalue()


def test_converters_name_a_flipped_bit_and_the_last_good_iteration(saved, tmp_path):
    from patch_megatron.conversion.errors import ConversionError
    from patch_megatron.conversion.megatron_checkpoint import open_checkpoint

    ckpt = copy(saved, tmp_path / "c")
    path = checkpointing.iteration_dir(ckpt, 4)
    shard = sorted(n for n in os.listdir(path) if n.endswith(".distcp"))[0]
    flip_a_bit(os.path.join(path, shard))
    with pytest.raises(ConversionError) as error:
        open_checkpoint(ckpt)
    assert f"{os.path.join(path, shard)} (sha256 differs" in str(error.value)
    assert "iteration 2" in str(error.value) and "--iteration 2" in str(error.value)
    assert open_checkpoint(ckpt, 2).iteration == 2


# ---------------------------------------------------------------------------
# pretrain_patch_gpt.py --load, all cases in one process (megatron imports once).

LOADS = textwrap.dedent("""
    import contextlib, io, json, os, sys
    sys.argv = ["pretrain_patch_gpt.py"]
    sys.path.insert(0, {repo!r})
    from pretrain_patch_gpt import main

    flags, cases = {flags!r}, {cases!r}
    results = {{}}
    for name, (ckpt, extra) in cases.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(flags + ["--train-iters", "6", "--load", ckpt,
                       "--use-checkpoint-opt_param-scheduler"] + extra)
        results[name] = (rc, err.getvalue())
    print(json.dumps(results))
""")


def load_each(cases, cwd):
    """pretrain_patch_gpt.py's load of each case, in one process: {name: (exit code, stderr)};
    none may end in a traceback."""
    code = LOADS.format(repo=REPO_ROOT, flags=FLAGS, cases=cases)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=environment(), timeout=300, cwd=str(cwd))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for name, (rc, err) in results.items():
        assert "Traceback" not in err, (name, err)
    return results


def test_pretrain_load_refuses_hostile_and_damaged_checkpoints(saved, tmp_path):
    marker = tmp_path / "ran"
    cases = {}

    def case(name, extra=()):
        ckpt = copy(saved, tmp_path / name)
        cases[name] = (ckpt, list(extra))
        return checkpointing.iteration_dir(ckpt, 4)

    plant_in_metadata(case("planted"), marker)
    path = case("bit_flip")
    flip_a_bit(os.path.join(path, "__0_0.distcp"))
    path = case("truncated")
    shard = os.path.join(path, "__0_1.distcp")
    os.truncate(shard, os.path.getsize(shard) // 3)
    os.remove(os.path.join(case("no_metadata"), ".metadata"))
    path = case("bit_flip_in_both")  # no earlier iteration verifies either
    flip_a_bit(os.path.join(path, "__0_0.distcp"))
    flip_a_bit(os.path.join(checkpointing.iteration_dir(cases["bit_flip_in_both"][0], 2), "__0_0.distcp"))
    os.remove(os.path.join(case("old_without_manifest"), safe_load.CHECKSUM_FILE))
    case("other_vocabulary", ["--vocab-size", "200"])

    results = load_each(cases, tmp_path)
    assert not marker.exists()

    def refused(name):
        rc, err = results[name]
        assert rc == 3, (name, rc, err)
        return err

    err = refused("planted")
    assert ".metadata holds a non-allow-listed object (builtins.eval)" in err
    good = checkpointing.iteration_dir(cases["planted"][0], 2)
    assert f"iteration 2 ({good}) verifies: resume from it by writing 2 into" in err
    err = refused("bit_flip")
    assert "__0_0.distcp (sha256 differs from the one saved: altered)" in err and "iteration 2 (" in err
    assert "__0_1.distcp (size" in refused("truncated") and "truncated" in refused("truncated")
    assert "iter_0000004/.metadata (missing)" in refused("no_metadata")
    assert "no earlier iteration there verifies either" in refused("bit_flip_in_both")
    rc, err = results["old_without_manifest"]
    assert rc == 0, err
    err = refused("other_vocabulary")
    assert "the vocabulary sizes differ" in err and "tokenizer may differ" in err
    assert "pick a --make-vocab-size-divisible-by" not in err


def test_the_legacy_torch_format_is_read_as_safely(tmp_path):
    """--ckpt-format torch (distributed optimizer: two files per rank): a planted pickle in
    either file (with a matching manifest) is refused without running it, a truncated file
    is named with the iteration that verifies."""
    save = str(tmp_path / "legacy")
    distributed = ["--use-distributed-optimizer"]
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "pretrain_patch_gpt.py"),
                             *FLAGS, *distributed, "--train-iters", "4", "--save-interval", "2",
                             "--save", save, "--ckpt-format", "torch"],
                            capture_output=True, text=True, env=environment(), timeout=240,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rank_file = os.path.join("iter_0000004", "mp_rank_00", checkpointing.TORCH_FORMAT_FILE)
    assert safe_load.check_checkpoint(checkpointing.iteration_dir(save, 4))["iteration"] == 4
    marker = tmp_path / "ran"
    cases = {name: (copy(save, tmp_path / name), distributed)
             for name in ("planted", "planted_in_optimizer", "truncated", "intact")}
    for name, file_name in (("planted", checkpointing.TORCH_FORMAT_FILE),
                            ("planted_in_optimizer", checkpointing.DISTRIBUTED_OPTIMIZER_FILE)):
        planted = os.path.join(cases[name][0], os.path.dirname(rank_file), file_name)
        state = torch.load(planted, weights_only=True)
        state["planted"] = Planted(4, marker)
        torch.save(state, planted)
        safe_load.write_checksums(os.path.dirname(os.path.dirname(planted)))
    truncated = os.path.join(cases["truncated"][0], rank_file)
    os.truncate(truncated, os.path.getsize(truncated) // 2)

    results = load_each(cases, tmp_path)
    assert not marker.exists()
    assert results["intact"][0] == 0, results["intact"][1]
    for name, file_name in (("planted", checkpointing.TORCH_FORMAT_FILE),
                            ("planted_in_optimizer", checkpointing.DISTRIBUTED_OPTIMIZER_FILE)):
        rc, err = results[name]
        assert rc == 3 and f"{file_name} holds objects other than tensors and plain data" in err, err
        assert "iteration 2 (" in err and "verifies" in err
    rc, err = results["truncated"]
    assert rc == 3 and f"{rank_file} (size" in err and "truncated" in err, err


def test_the_legacy_torch_format_loads_only_at_its_tensor_and_pipeline_sizes(tmp_path,
                                                                              monkeypatch):
    def folders(*names):
        path = tmp_path / "-".join(names)
        for name in names:
            (path / name).mkdir(parents=True)
        return str(path)

    tp2 = folders("mp_rank_00", "mp_rank_01")
    pp2 = folders("mp_rank_00_000", "mp_rank_00_001")
    assert checkpointing.torch_format_layout(tp2) == (2, 1)
    assert checkpointing.torch_format_layout(pp2) == (1, 2)
    assert checkpointing.torch_format_layout(folders("mp_rank_00", "mp_rank_00_001")) is None
    # This rank: TP rank 1 of 2, one pipeline stage, data-parallel rank 0.
    monkeypatch.setattr(checkpointing, "_layout", lambda: ((1, 2), (0, 1), 0))
    assert checkpointing._torch_format_file(tp2) == os.path.join(
        tp2, "mp_rank_01", checkpointing.TORCH_FORMAT_FILE)
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"loads only at the tensor x pipeline parallel sizes that wrote it: "
                             r"it was saved at TP 1 x PP 2, this run is TP 2 x PP 1"):
        checkpointing._torch_format_file(pp2)


def test_two_ranks_share_the_hashing_and_rank_0_names_the_damage(saved, tmp_path):
    """Each rank hashes half the files; the damage rank 1 finds is named by rank 0."""
    import socket

    ckpt = copy(saved, tmp_path / "c")
    path = checkpointing.iteration_dir(ckpt, 4)
    names = sorted(json.load(open(os.path.join(path, safe_load.CHECKSUM_FILE)))["files"])
    flip_a_bit(os.path.join(path, names[1]))  # rank 1's share (every second file from the second)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={port}",
         os.path.join(REPO_ROOT, "pretrain_patch_gpt.py"), *FLAGS, "--train-iters", "6",
         "--tensor-model-parallel-size", "2", "--load", ckpt],
        capture_output=True, text=True, env=environment(), timeout=240, cwd=REPO_ROOT)
    assert result.returncode != 0
    assert f"{os.path.join(path, names[1])} (sha256 differs" in result.stderr, result.stderr[-3000:]
    assert "iteration 2 (" in result.stderr


def test_numpy_2_arrays_under_numpy_1_are_named_as_such_not_as_unsafe(monkeypatch):
    import numpy

    error = pickle.UnpicklingError(
        "Weights only load failed. Unsupported global: GLOBAL numpy._core.multiarray._reconstruct")
    monkeypatch.setattr(numpy, "__version__", "1.26.0")
    message = str(safe_load.unpickling_error("ckpt/__0_0.distcp", "rng_state", error))
    assert "saved under numpy 2" in message and "install numpy >= 2" in message
    assert "may run code" not in message
    monkeypatch.setattr(numpy, "__version__", "2.4.0")  # under numpy 2 the same name is foreign
    assert isinstance(safe_load.unpickling_error("x", "rng_state", error),
                      safe_load.ForbiddenObjectError)
    other = pickle.UnpicklingError("Unsupported global: GLOBAL os.system")
    monkeypatch.setattr(numpy, "__version__", "1.26.0")
    assert "may run code" in str(safe_load.unpickling_error("x", "item", other))
