"""Converters' outputs: never over their own input, published with the usual permissions."""

import os
import stat

import pytest

from two_stage import run_tool


def _fake_run(directory):
    """A --save directory as a training run leaves it (the converters must not read it here)."""
    for iteration in (4, 8):
        folder = directory / f"iter_{iteration:07d}"
        folder.mkdir(parents=True)
        (folder / "common.pt").write_bytes(b"weights of iteration %d" % iteration)
    (directory / "latest_checkpointed_iteration.txt").write_text("8")
    return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def _unchanged(directory, before):
    return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*")
            if p.is_file()} == before


@pytest.mark.parametrize("tool, input_flag, output_flag", [
    ("convert_to_hf", "--load", "--output"),
    ("convert_patch_to_token", "--load", "--save"),
    ("convert_from_hf", "--hf-dir", "--save"),
])
@pytest.mark.parametrize("where", ["same", "inside", "parent", "symlink"])
def test_an_output_over_the_input_is_refused_even_with_force(tmp_path, tool, input_flag,
                                                             output_flag, where):
    run = tmp_path / "run"
    before = _fake_run(run)
    output = {"same": run, "inside": run / "iter_0000008", "parent": tmp_path,
              "symlink": tmp_path / "alias"}[where]
    if where == "symlink":
        os.symlink(run, output)
    code, err = run_tool(tool, [input_flag, str(run), output_flag, str(output), "--force"])
    assert code == 2, err
    relation = {"same": "is", "inside": "lies inside", "parent": "contains", "symlink": "is"}[where]
    assert f"error: {output_flag} {output} {relation} the input {input_flag} {run}" in err
    assert "even with --force" in err and len(err.strip().splitlines()) == 1
    assert _unchanged(run, before)


def test_published_output_honours_the_umask(tmp_path):
    from patch_megatron.conversion.output_dir import publish_directory

    previous = os.umask(0o022)
    try:
        with publish_directory(str(tmp_path / "out")) as staging:
            os.makedirs(os.path.join(staging, "sub"))
            import tempfile

            fd, name = tempfile.mkstemp(dir=staging)  # 0600, as safetensors' temporary files
            os.close(fd)
            os.rename(name, os.path.join(staging, "model.safetensors"))
        os.umask(0o027)
        with publish_directory(str(tmp_path / "group"), force=True) as staging:
            open(os.path.join(staging, "config.json"), "w").close()
    finally:
        os.umask(previous)

    def mode(path):
        return stat.S_IMODE(os.stat(path).st_mode)

    assert mode(tmp_path / "out") == 0o755
    assert mode(tmp_path / "out" / "sub") == 0o755
    assert mode(tmp_path / "out" / "model.safetensors") == 0o644
    assert mode(tmp_path / "group") == 0o750
    assert mode(tmp_path / "group" / "config.json") == 0o640
