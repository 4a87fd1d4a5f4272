"""Figures read back from a run's console log (the quickstart, the benchmarks, the tests).

The loop's log lines are Megatron-LM's format; these helpers are the one place
that parses them, so a format change breaks one module and its test.
"""

from __future__ import annotations

import re
from typing import Dict, List, Tuple

_VALIDATION = re.compile(r"validation (\w+) stage at iteration (\d+) \| (.*)")
_TOKENS_PER_SECOND = re.compile(r"tokens per second: ([\d.]+)")
_TRAINING = re.compile(r"iteration\s+(\d+)/\s*\d+ \|(.*)")
_EST_SUMMARY = re.compile(r"EST summary: \d+ steps, ([\d.e+-]+) FLOPs trained vs ([\d.e+-]+) for the full")
_RUNNER_STEP = re.compile(r"^\[\d+/\d+\] ([^:\n]+): ", re.M)
_RUNNER_DONE = re.compile(r"^\[\d+/\d+\] ([^:\n]+): done in ([\d.]+) s$", re.M)


def training_lines(log_text: str) -> Dict[int, Dict[str, str]]:
    """iteration -> that training line's fields, ``name -> value`` as printed.

    A line reads ``[time] iteration  4/  8 | consumed samples: 16 | ... | patch loss: 4.1E+00 |``;
    values stay strings, so a caller can compare them digit for digit.
    """
    lines = {}
    for match in _TRAINING.finditer(log_text):
        fields = {}
        for part in match.group(2).split(" | "):
            name, sep, value = part.strip(" |").partition(": ")
            if sep:
                fields[name.strip()] = value.strip()
        lines[int(match.group(1))] = fields
    return lines


def losses(log_text: str) -> Dict[int, str]:
    """iteration -> training loss as printed (``patch loss`` or ``lm loss``)."""
    return {i: f.get("patch loss", f.get("lm loss")) for i, f in training_lines(log_text).items()
            if "patch loss" in f or "lm loss" in f}


def validation_lines(log_text: str) -> List[Tuple[str, int, Dict[str, str]]]:
    """[(stage, iteration, {name: value})] of every validation line, values as printed.

    A line reads `` validation patch stage at iteration 4 | patch loss value: 4.1E+00 | ...``.
    """
    return [(match.group(1), int(match.group(2)),
             dict(part.split(" value: ") for part in match.group(3).strip(" |").split(" | ")))
            for match in _VALIDATION.finditer(log_text)]


def validation_curve(log_text: str) -> List[Tuple[int, float]]:
    """[(iteration, held-out token NLL)] of every validation line.

    The token stage logs ``lm loss``; the patch stage logs its patch loss and
    ``token nll (K=1)``, the token-format NLL that compares across stages.
    """
    points = []
    for _, iteration, values in validation_lines(log_text):
        nll = values.get("lm loss", values.get("token nll (K=1)"))
        if nll is not None:
            points.append((iteration, float(nll)))
    return points


def tokens_per_second(log_text: str, skip_first: int = 1) -> float:
    """Mean training tokens/s over the logged intervals after the first ``skip_first`` (warm-up)."""
    rates = [float(r) for r in _TOKENS_PER_SECOND.findall(log_text)]
    rates = rates[skip_first:] or rates
    return sum(rates) / len(rates) if rates else float("nan")


def runner_sections(log_text: str) -> Dict[str, str]:
    """tools/pretrain_two_stage.py's output by step ("patch stage", "handoff", "token stage"):
    each step's header and what its process printed."""
    sections: Dict[str, str] = {}
    headers = list(_RUNNER_STEP.finditer(log_text))
    for header, following in zip(headers, headers[1:] + [None]):
        end = following.start() if following else len(log_text)
        name = header.group(1)
        sections[name] = sections.get(name, "") + log_text[header.start():end]
    return sections


def runner_seconds(log_text: str) -> Dict[str, float]:
    """Wall-clock seconds of each step the runner ran (skipped steps have none)."""
    return {match.group(1): float(match.group(2)) for match in _RUNNER_DONE.finditer(log_text)}


def est_flops(log_text: str) -> Tuple[float, float]:
    """(FLOPs the subnetworks trained, the full model's) from the EST summary line."""
    match = _EST_SUMMARY.search(log_text)
    if match is None:
        raise ValueError("the log has no 'EST summary' line: was the run trained with --est?")
    return float(match.group(1)), float(match.group(2))
