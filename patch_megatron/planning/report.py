"""Human-readable table and JSON for a plan."""

from __future__ import annotations

import dataclasses
import json

from patch_megatron.planning.commands import Command
from patch_megatron.planning.plan import ComputePlan


def _si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


def _hours(plan: ComputePlan, flops: float) -> str:
    hours = plan.hours(flops)
    if hours is None:
        return ""
    hw = plan.hardware
    return f"  ({hours:,.1f} h on {hw.gpus}×{hw.gpu_name} at {hw.mfu:.0%} MFU; {hours * hw.gpus:,.0f} GPU-h)"


def to_dict(plan: ComputePlan, commands: list[Command]) -> dict:
    shape = dataclasses.asdict(plan.shape)
    result = {
        "inputs": dataclasses.asdict(plan.inputs),
        "shape": shape,
        "parameters": plan.parameters,
        "non_embedding_parameters": plan.non_embedding_parameters,
        "padded_vocab_size": plan.padded_vocab_size,
        "flops_per_token": {
            "token_stage": plan.flops_per_token_token_stage,
            "patch_stage": plan.flops_per_token_patch_stage,
            "chinchilla_6N": plan.six_n,
        },
        "token_only": {
            "tokens": plan.tokens,
            "tokens_per_parameter": plan.tokens_per_parameter,
            "compute": plan.token_only_compute,
            "predicted_loss": plan.predicted_loss,
            "hours": plan.hours(plan.token_only_compute),
        },
        "patch_level": {
            "enabled": plan.uses_patch_stage,
            "cost_factor": plan.patch_cost_factor,
            "compute": plan.patch_compute,
            "saved_compute": plan.patch_saved_compute,
            "hours": plan.hours(plan.patch_compute),
            "same_budget_more_data": {
                "tokens": plan.more_data_tokens,
                "predicted_loss": plan.more_data_predicted_loss,
            },
        },
        "est_flops_factor": plan.est_flops_factor,
        "planned_compute": plan.planned_compute,
        "planned_hours": plan.hours(plan.planned_compute),
        "loss_fit": plan.loss_fit_source,
        "chinchilla_reference": plan.chinchilla_reference,
        "hardware": None if plan.hardware is None else dataclasses.asdict(plan.hardware),
        "data_parallel_size": plan.data_parallel_size,
        "global_batch_size": plan.global_batch_size,
        "total_iters": plan.total_iters,
        "stages": [dataclasses.asdict(s) for s in plan.stages],
        "commands": [
            {"name": c.name, "launcher": c.launcher, "script": c.script, "args": c.args, "shell": c.shell()}
            for c in commands
        ],
        "assumptions": plan.assumptions,
        "warnings": plan.warnings,
    }
    return result


def to_json(plan: ComputePlan, commands: list[Command]) -> str:
    return json.dumps(to_dict(plan, commands), indent=2)


def to_text(plan: ComputePlan, commands: list[Command]) -> str:
    s = plan.shape
    inputs = plan.inputs
    ref = plan.chinchilla_reference
    lines = []
    add = lines.append
    add("Compute-optimal plan")
    add("=" * 72)
    row = "{:<34}{}".format
    add(row("model shape", f"{s.name}: {s.num_layers} layers, hidden {s.hidden_size}, ffn {s.ffn_hidden_size}, "
                           f"{s.num_attention_heads} heads / {s.num_query_groups} groups"))
    add(row("parameters", f"{_si(plan.parameters)} ({_si(plan.non_embedding_parameters)} without embeddings)"))
    add(row("parallelism", f"TP={s.tensor_model_parallel_size} PP={s.pipeline_model_parallel_size}"
                           + (f" DP={plan.data_parallel_size}" if plan.data_parallel_size else "")))
    add(row("training FLOPs per token", f"{plan.flops_per_token_token_stage:.3g} token stage, "
                                        f"{plan.flops_per_token_patch_stage:.3g} patch stage (6N = {plan.six_n:.3g})"))
    add("-" * 72)
    add("Token-only")
    add(row("  tokens", f"{_si(plan.tokens)} ({plan.tokens_per_parameter:.1f} per parameter)"))
    add(row("  compute", f"{plan.token_only_compute:.3g} FLOPs" + _hours(plan, plan.token_only_compute)))
    add(row("  predicted loss", f"{plan.predicted_loss:.3f} ({inputs.loss_fit})"))
    add(row("  Chinchilla reference (6ND)",
            f"rule N={_si(ref['rule_parameters'])} D={_si(ref['rule_tokens'])}; "
            f"fit N={_si(ref['fit_parameters'])} D={_si(ref['fit_tokens'])}"))
    if plan.uses_patch_stage:
        add("-" * 72)
        add(f"Patch-level, K={inputs.patch_size}, λ={inputs.patch_fraction:.3g} (same model, same tokens)")
        add(row("  cost vs token-only", f"{plan.patch_cost_factor:.3f}"))
        add(row("  compute", f"{plan.patch_compute:.3g} FLOPs" + _hours(plan, plan.patch_compute)))
        add(row("  saved", f"{plan.patch_saved_compute:.3g} FLOPs" + _hours(plan, plan.patch_saved_compute)))
        add(row("  or: token-only budget buys", f"{_si(plan.more_data_tokens)} tokens, "
                                               f"predicted loss {plan.more_data_predicted_loss:.3f}"))
    if inputs.est:
        add(row("EST FLOPs factor", f"{plan.est_flops_factor:.2f}"))
    add(row("planned compute (commands below)", f"{plan.planned_compute:.3g} FLOPs" + _hours(plan, plan.planned_compute)))
    add("-" * 72)
    add(f"Stages (run: {plan.total_iters:,} steps of {plan.global_batch_size} token-stage samples, "
        f"{plan.global_batch_size * inputs.seq_length:,} tokens per step)")
    for st in plan.stages:
        add(f"  {st.name:<11} K={st.patch_size}  tokens {_si(st.tokens):>7}  batch {st.global_batch_size} samples  "
            f"iters {st.train_iters:,}  warmup {st.warmup_iters}  {st.flops:.3g} FLOPs")
    add("-" * 72)
    add("Assumptions")
    lines.extend(f"  - {a}" for a in plan.assumptions)
    if plan.warnings:
        add("Warnings")
        lines.extend(f"  ! {w}" for w in plan.warnings)
    add("-" * 72)
    add("Commands")
    for c in commands:
        add(f"# {c.name}")
        add(c.shell())
    return "\n".join(lines)
