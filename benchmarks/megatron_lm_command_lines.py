"""How many of Megatron-LM's own GPT command lines pretrain_patch_gpt.py's parser accepts.

    python benchmarks/megatron_lm_command_lines.py --megatron-lm MLM

MLM is a folder holding Megatron-LM's ``examples`` and
``tests/functional_tests/test_cases/gpt`` at the release matching the pinned
megatron-core (``git archive core_v0.16.1 examples tests/functional_tests``). Those that
parse are then checked as ``--check-only`` would check them for the processes they launch
on (the batch against the data-parallel size, the interleaved schedule's micro-batches).
Each dense GPT/LLaMA configuration (mixture-of-experts, multi-latent attention,
RL, FSDP, hybrid and inference cases left out) is parsed as Megatron-LM's
``pretrain_gpt.py`` would get it, with the patch flags ``--patch-size 4
--patch-data-fraction 0.667`` added; the script prints how many parse, and
which flags stop the others (refused with a reason, or unknown).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from patch_megatron.training import arguments  # noqa: E402
from patch_megatron.training.arguments import ArgumentError, check_world_size, parse_args  # noqa: E402

# The launch-time checks run as on a GPU node that has the optional packages (Transformer
# Engine, wandb) the configurations ask for: this machine's own packages are not the question.
arguments._check_installed = lambda args: None
# Megatron-LM's functional tests run on one 8-GPU node unless their configuration says how many
# GPUs (GPUS); a larger model-parallel group gets one data-parallel replica.
GPUS_PER_NODE = 8
GPUS: dict[str, int] = {}

LEFT_OUT = ("moe", "mla", "_ep", "fsdp", "gdn", "modelopt", "mamba", "hybrid", "inference", "rl",
            "grpo", "distill", "export", "experts", "fp8", "fp4", "multi_dist_optimizer")
PATCH_FLAGS = ["--patch-size", "4", "--patch-data-fraction", "0.667"]


# What Megatron-LM's functional-test launcher sets in the environment, where a flag's value
# needs a number; any other placeholder (a path) stands for itself, in lower case.
HARNESS_VALUES = {"REPEAT": "1"}


def _placeholders(value: str) -> str:
    return re.sub(r"\$\{?([A-Z_]+)\}?",
                  lambda m: HARNESS_VALUES.get(m.group(1), m.group(1).lower()), value)


def _harness_words(value) -> list[str]:
    """A configuration value as the launcher (``shell_test_utils/_run_training.sh``) passes it:
    ``[a b c]`` loses its brackets and becomes one argument a word; any other value, spaces and
    all, stays one argument."""
    text = _placeholders(str(value).strip())
    if re.fullmatch(r"\[[^]]+\]", text):
        return text[1:-1].split()
    return [text]


def functional_tests(root: str) -> dict[str, list[str]]:
    import yaml

    lines = {}
    for path in sorted(glob.glob(os.path.join(root, "tests/functional_tests/test_cases/gpt/*/model_config.yaml"))):
        name = os.path.basename(os.path.dirname(path))
        if any(part in name for part in LEFT_OUT):
            continue
        argv = []
        config = yaml.safe_load(open(path))
        # A configuration may name its node's GPU count (its MODEL_ENV_VARS).
        gpus = ((config.get("MODEL_ENV_VARS") or {}).get("MODEL_ARGS") or {}).get("GPUS_PER_NODE")
        if gpus:
            GPUS[name] = int(gpus)
        for flag, value in (config.get("MODEL_ARGS") or {}).items():
            if value is True:
                argv.append(flag)
            elif value is not False and value is not None:
                argv += [flag, *_harness_words(value)]
        lines[name] = argv
    return lines


def example(path: str) -> list[str]:
    """The training flags of an example script's argument arrays (the launcher's left out),
    with the script's own variable values, and placeholders for what it reads from its caller."""
    text = open(path).read()
    values = {}
    for name, value in re.findall(r"^([A-Z_]+)=(.*)$", text, flags=re.M):
        value = value.split("#")[0].strip().strip('"')
        default = re.fullmatch(r"\$\{[A-Z_0-9]+:-(.*)\}", value)
        values[name] = default.group(1) if default else value

    def substitute(line: str) -> str:
        return re.sub(r"\$\{?([A-Z_]+)\}?", lambda m: values.get(m.group(1), m.group(1).lower()),
                      line)

    blocks = [block for name, block in re.findall(r"^([A-Z_]+_ARGS)=\(\n(.*?)^\)", text,
                                                   flags=re.S | re.M)
              if name != "DISTRIBUTED_ARGS"]  # torchrun's
    # A data list built conditionally: its last branch (real data rather than mock data).
    data = re.findall(r"^\s*DATA_ARGS_LIST\+=\(\n(.*?)^\s*\)", text, flags=re.S | re.M)
    argv = []
    for block in blocks + data[-1:]:
        for line in block.splitlines():
            line = substitute(line.split("#")[0].strip().strip('"'))
            argv += [word.strip("'") for word in line.split()]
    return argv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--megatron-lm", required=True)
    options = p.parse_args()
    lines = functional_tests(options.megatron_lm)
    for script in ("examples/gpt3/train_gpt3_175b_distributed.sh",
                   "examples/llama/train_llama3_8b_h100_fp8.sh"):
        lines[script] = example(os.path.join(options.megatron_lm, script))
    parsed, stops, launchable = [], collections.Counter(), collections.Counter()
    for name, argv in lines.items():
        if "--vocab-file" in argv and "--tokenizer-type" not in argv:
            # The functional-test configurations leave the tokenizer type to their launcher;
            # Megatron-LM itself has no default. Their files are GPT-2's BPE.
            argv = argv + ["--tokenizer-type", "GPT2BPETokenizer"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                args = parse_args(argv + PATCH_FLAGS)
                parsed.append(name)
            except ArgumentError as error:
                stops[str(error).split(" (")[0][:140]] += 1
                continue
            model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
            try:
                check_world_size(args, max(GPUS.get(name, GPUS_PER_NODE), model_parallel))
                launchable["ok"] += 1
            except ArgumentError as error:
                launchable[str(error)[:140]] += 1
    print(f"{len(parsed)} of {len(lines)} Megatron-LM GPT command lines parse "
          f"(with {' '.join(PATCH_FLAGS)})")
    for reason, count in stops.most_common():
        print(f"{count:4d}  {reason}")
    print(f"{launchable.pop('ok', 0)} of those {len(parsed)} also pass the launch-time checks "
          f"for the processes they run on ({GPUS_PER_NODE} unless the configuration says, or one "
          "data-parallel replica of a larger model)")
    for reason, count in launchable.most_common():
        print(f"{count:4d}  {reason}")


if __name__ == "__main__":
    main()
