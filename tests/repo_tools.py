"""The repository root and its ``tools/`` scripts, for tests that run them in-process.

A plain module (not conftest.py): several test folders have a conftest, so
``from conftest import ...`` would pick whichever was imported first.
"""

import importlib.util
import os

from patch_megatron.parallel import free_port  # noqa: F401  (the tests' one too)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name):
    """Import ``tools/<name>.py`` as a module (tools are scripts, not a package)."""
    return load_module(os.path.join(REPO_ROOT, "tools", f"{name}.py"), f"tool_{name}")


def load_module(path, name=None):
    """Import a script of the repository (a tool, an example) as a module."""
    name = name or os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child_environment(**extra):
    """The environment for a training or tool subprocess: one thread, no warnings, and a
    rendezvous port of its own. The port is always fresh because a one-process world set up
    in the test process (conversion tests) leaves its MASTER_PORT in os.environ, in use."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MASTER_PORT=str(free_port()))
    env.update(extra)
    return env


# Training runs in tests read batches in the training process: each run's reader processes
# (--num-workers, default 2 as in Megatron-LM) start a fresh interpreter that imports torch,
# about a second of CPU per process, and the suite launches a few hundred. The reader processes
# themselves are tested where they matter: tests/training/test_loop.py compares 2 workers with
# 0, and the kill and signal tests in tests/test_pretrain_patch_gpt.py keep the default.
IN_PROCESS_READING = ("--num-workers", "0")


def write_tiktoken_vocabulary(path, text: str, merges: int = 300) -> int:
    """A TikTokenizer vocabulary .json (megatron-core's format: the 256 bytes, then BPE merges
    learnt here on ``text``'s words); returns its number of entries."""
    import base64
    import collections
    import json
    import re

    words = collections.Counter(w.encode() for w in re.findall(r" ?\w+| ?[^\w\s]+|\s+", text))
    pieces = {word: [bytes([b]) for b in word] for word in words}
    tokens = [bytes([b]) for b in range(256)]
    for _ in range(merges):
        pairs = collections.Counter()
        for word, count in words.items():
            parts = pieces[word]
            for a, b in zip(parts, parts[1:]):
                pairs[a, b] += count
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        tokens.append(a + b)
        for word, parts in pieces.items():
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == (a, b):
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            pieces[word] = merged
    entries = [{"rank": i, "token_bytes": base64.b64encode(t).decode(),
                "token_str": t.decode("utf-8", errors="replace")} for i, t in enumerate(tokens)]
    with open(path, "w") as f:
        json.dump(entries, f)
    return len(entries)
