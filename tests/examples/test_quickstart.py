"""examples/quickstart.py's report: the loss-against-compute plot is written with matplotlib."""

import os

from repo_tools import REPO_ROOT, load_module


def test_plot_writes_the_loss_against_compute_figure(tmp_path):
    quickstart = load_module(os.path.join(REPO_ROOT, "examples", "quickstart.py"))
    workflow = quickstart.Workflow(str(tmp_path), train_tokens=1000)
    patch, token, base = [(10, 6.0), (20, 5.5)], [(10, 5.2), (20, 5.0)], [(10, 5.8), (40, 4.9)]
    quickstart.plot(workflow, patch, token, base, {"patch": 1e9, "token": 4e9}, patch_iters=20)
    figure = tmp_path / "loss_vs_compute.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 5000
