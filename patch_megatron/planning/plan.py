"""Sizing a run: model shape, tokens, compute, predicted loss, and what
patch-level training and EST change.

Accounting. Chinchilla states its results in C = 6·N·D; the planner keeps
that for the paper's reference numbers but spends budgets with the exact
per-token FLOPs of our architecture (patch_megatron.flops: attention with
full s² scores, SwiGLU, untied LM head over the padded vocabulary), so the
tokens it plans are what the training loop will actually afford.

Patch-level assumption (the paper found no scaling law in K and λ, so one
has to be stated): patch-level training over D tokens reaches the loss that
token-only training reaches over the same D tokens, at
λ·(per-token FLOPs of the patch stage) + (1-λ)·(token stage) of the cost,
which is λ/K + (1-λ) when both stages use the same T. The paper measured
this at K=4, λ∈{1/2, 2/3} for 370M-2.7B on 360B tokens; it found patch
training slightly worse with little data (45B tokens for 370M) and better as
data grows. The planner's commands follow this "same model, same data, less
compute" reading; it also reports, under the same assumption, the tokens and
loss the full budget would buy if the saving were spent on more data.

EST assumption: EST's expected FLOPs factor (default 0.75, the published
savings were 25.0-26.7%) applies to the whole run at no loss in quality, and
combines multiplicatively with patch-level training (untested together).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from patch_megatron.flops import flops_per_token
from patch_megatron.model.shape import padded_vocab_size
from patch_megatron.training.arguments import stage_iterations
from patch_megatron.planning import chinchilla
from patch_megatron.planning.hardware import HardwareBudget, make_hardware_budget
from patch_megatron.planning.shapes import SHAPE_TABLE, ShapeChoice, nearest_shape

PAPER_WARMUP_ITERS = 2000
# A stage's warmup is the paper's 2000 steps, capped at this fraction of the
# stage so that short runs still spend most steps at a useful learning rate.
MAX_WARMUP_FRACTION = 0.05
DEFAULT_EST_FLOPS_FACTOR = 0.75


class PlanningError(ValueError):
    """Inputs the planner cannot turn into a plan; the message says which and how to fix it."""


@dataclass
class PlanInputs:
    # Budget: give a FLOP budget, or GPUs × hours; and/or a model size and/or a token count.
    compute: Optional[float] = None
    gpus: Optional[int] = None
    hours: Optional[float] = None
    gpu: str = "H100"
    mfu: Optional[float] = None
    parameters: Optional[float] = None  # total, embeddings included
    tokens: Optional[float] = None
    # Patch-level training (K=1 or λ=0: token-only).
    patch_size: int = 4
    patch_fraction: float = 2.0 / 3.0
    # Evolving Subnetwork Training.
    est: bool = False
    est_flops_factor: float = DEFAULT_EST_FLOPS_FACTOR
    # Chinchilla choices.
    sizing: str = "rule"  # "rule": ~20 tokens/parameter; "fit": minimise the loss fit
    loss_fit: str = chinchilla.DEFAULT_LOSS_FIT
    tokens_per_parameter: float = chinchilla.TOKENS_PER_PARAMETER
    # Model and batch.
    seq_length: int = 2048
    vocab_size: int = 32000
    global_batch_tokens: Optional[int] = None
    micro_batch_size: int = 1


@dataclass
class PlannedStage:
    name: str  # "patch", "token" or "token-only"
    patch_size: int
    tokens: float  # what the stage trains on (whole steps)
    global_batch_size: int  # this stage's samples per step (B/K in the patch stage)
    train_iters: int  # this stage's steps
    warmup_iters: int
    flops: float


@dataclass
class ComputePlan:
    inputs: PlanInputs
    shape: ShapeChoice
    parameters: int
    non_embedding_parameters: int
    padded_vocab_size: int
    flops_per_token_token_stage: float
    flops_per_token_patch_stage: float
    six_n: float  # Chinchilla's per-token FLOPs, for comparison
    tokens: float
    tokens_per_parameter: float
    token_only_compute: float
    predicted_loss: float
    loss_fit_source: str
    patch_cost_factor: float  # patch-level compute / token-only compute, same tokens
    patch_compute: float
    patch_saved_compute: float
    more_data_tokens: float  # tokens the token-only compute buys with patch-level training
    more_data_predicted_loss: float
    est_flops_factor: float  # 1.0 when EST is off
    planned_compute: float  # what the emitted commands cost
    chinchilla_reference: dict
    hardware: Optional[HardwareBudget]
    data_parallel_size: Optional[int]
    global_batch_size: int  # B: token-stage samples per step (the patch stage runs B/K)
    total_iters: int  # N: steps of both stages together, at B·T tokens each
    stages: list[PlannedStage]
    assumptions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def uses_patch_stage(self) -> bool:
        return self.inputs.patch_size > 1 and self.inputs.patch_fraction > 0

    def hours(self, flops: float) -> Optional[float]:
        return None if self.hardware is None else self.hardware.hours_for(flops)


def _positive(name: str, value, flag: str) -> None:
    if value is not None and not value > 0:
        raise PlanningError(f"{name} must be positive, got {value!r}: pass a positive {flag}")


def validate(inputs: PlanInputs) -> None:
    _positive("the FLOP budget", inputs.compute, "--compute (e.g. 1e21)")
    _positive("the model size", inputs.parameters, "--params (e.g. 1.3e9)")
    _positive("the token budget", inputs.tokens, "--tokens (e.g. 2.6e10)")
    _positive("hours", inputs.hours, "--hours")
    if inputs.gpus is not None and (not isinstance(inputs.gpus, int) or inputs.gpus < 1):
        raise PlanningError(f"--gpus must be a positive integer, got {inputs.gpus!r}")
    if inputs.mfu is not None and not 0 < inputs.mfu <= 1:
        raise PlanningError(
            f"MFU {inputs.mfu!r} is impossible: it is the achieved fraction of the GPU's peak, "
            "so it must lie in (0, 1]; pass e.g. --mfu 0.4")
    if not isinstance(inputs.patch_size, int) or inputs.patch_size < 1:
        raise PlanningError(f"patch size K must be an integer >= 1, got {inputs.patch_size!r} (K=1 is token-only)")
    if not 0 <= inputs.patch_fraction < 1:
        raise PlanningError(
            f"patch data fraction λ must lie in [0, 1), got {inputs.patch_fraction!r}: the token stage "
            "needs some data (λ=0 is token-only; the paper's best is 2/3)")
    if inputs.est and not 0 < inputs.est_flops_factor <= 1:
        raise PlanningError(
            f"EST FLOPs factor must lie in (0, 1], got {inputs.est_flops_factor!r} "
            "(0.75 means EST costs 75% of full training)")
    if inputs.sizing not in ("rule", "fit"):
        raise PlanningError(f"sizing must be 'rule' or 'fit', got {inputs.sizing!r}")
    if inputs.loss_fit not in chinchilla.LOSS_FITS:
        raise PlanningError(f"unknown loss fit {inputs.loss_fit!r}; choose one of {sorted(chinchilla.LOSS_FITS)}")
    _positive("tokens per parameter", inputs.tokens_per_parameter, "--tokens-per-param")
    for name in ("seq_length", "vocab_size", "micro_batch_size"):
        value = getattr(inputs, name)
        if not isinstance(value, int) or value < 1:
            raise PlanningError(f"{name} must be a positive integer, got {value!r}")
    if inputs.global_batch_tokens is not None and inputs.global_batch_tokens < inputs.seq_length:
        raise PlanningError(
            f"global batch of {inputs.global_batch_tokens} tokens is below one sample of "
            f"{inputs.seq_length} tokens; raise --global-batch-tokens")
    if inputs.hours is not None and inputs.gpus is None:
        raise PlanningError("--hours needs --gpus (the budget is GPUs × hours × peak × MFU)")
    if inputs.hours is not None and inputs.compute is not None:
        raise PlanningError("give the budget once: either --compute or --gpus with --hours, not both")
    budget_given = inputs.compute is not None or inputs.hours is not None
    if budget_given and inputs.parameters is not None and inputs.tokens is not None:
        raise PlanningError(
            "budget, model size and token count together over-determine the plan: drop one of them")
    if not budget_given and inputs.parameters is None and inputs.tokens is None:
        raise PlanningError(
            "nothing to plan from: give --compute, or --gpus and --hours, or --params, or --tokens")


def _token_flops_per_token(choice: ShapeChoice, inputs: PlanInputs, vocab_rows: int) -> float:
    return flops_per_token(choice.model_shape(vocab_rows), inputs.seq_length)


def _padded_vocab(choice: ShapeChoice, inputs: PlanInputs) -> int:
    return padded_vocab_size(inputs.vocab_size, tensor_model_parallel_size=choice.tensor_model_parallel_size)


def _choose_shape_and_tokens(inputs: PlanInputs, compute: Optional[float], fit: chinchilla.LossFit):
    """Returns (shape, tokens) for the token-only plan."""
    r = inputs.tokens_per_parameter

    def n_of(choice):  # real parameters (unpadded vocabulary), what the fits count
        return choice.parameters(inputs.vocab_size)

    def fpt_of(choice):
        return _token_flops_per_token(choice, inputs, _padded_vocab(choice, inputs))

    if compute is not None and inputs.parameters is None and inputs.tokens is None:
        if inputs.sizing == "rule":
            def score(c):
                return abs(math.log(compute / fpt_of(c) / (r * n_of(c))))
        else:
            def score(c):
                return fit.loss(n_of(c), compute / fpt_of(c))
        choice = min(SHAPE_TABLE, key=score)
        return choice, compute / fpt_of(choice)
    if compute is not None and inputs.parameters is not None:
        choice = nearest_shape(inputs.parameters, inputs.vocab_size)
        return choice, compute / fpt_of(choice)
    if compute is not None and inputs.tokens is not None:
        choice = min(SHAPE_TABLE, key=lambda c: abs(math.log(fpt_of(c) * inputs.tokens / compute)))
        return choice, inputs.tokens
    if inputs.parameters is not None and inputs.tokens is not None:
        return nearest_shape(inputs.parameters, inputs.vocab_size), inputs.tokens
    if inputs.parameters is not None:
        choice = nearest_shape(inputs.parameters, inputs.vocab_size)
        n = n_of(choice)
        tokens = r * n if inputs.sizing == "rule" else fit.optimal_tokens_for_params(n)
        return choice, tokens
    # tokens only
    target_n = inputs.tokens / r if inputs.sizing == "rule" else fit.optimal_params_for_tokens(inputs.tokens)
    return nearest_shape(target_n, inputs.vocab_size), inputs.tokens


def _data_parallel_size(choice: ShapeChoice, gpus: Optional[int]) -> Optional[int]:
    if gpus is None:
        return None
    model_parallel = choice.tensor_model_parallel_size * choice.pipeline_model_parallel_size
    if gpus < model_parallel or gpus % model_parallel:
        raise PlanningError(
            f"{gpus} GPUs cannot hold the {choice.name} shape at TP={choice.tensor_model_parallel_size} × "
            f"PP={choice.pipeline_model_parallel_size}: use a multiple of {model_parallel} GPUs")
    return gpus // model_parallel


def _warmup(iters: int) -> int:
    return min(PAPER_WARMUP_ITERS, math.floor(MAX_WARMUP_FRACTION * iters))


def _stage_runs(plan_tokens: float, choice: ShapeChoice, inputs: PlanInputs, dp: Optional[int],
                fpt_token: float, fpt_patch: float, warnings: list[str]) -> tuple[int, int, list[PlannedStage]]:
    """Returns (B, N, stages): B token-stage samples per step and N steps of the
    whole run at B·T tokens per step. The stages split the N·B·T tokens as
    pretrain_patch_gpt.py splits its --train-tokens (``stage_iterations``): the
    patch stage runs the whole steps of the first λ of them, B/K samples of K·T
    tokens each, the token stage the rest of the N steps, B samples each."""
    k = inputs.patch_size
    use_patch = k > 1 and inputs.patch_fraction > 0
    batch_tokens = inputs.global_batch_tokens or choice.global_batch_tokens
    # B must be a multiple of K·micro·DP so that the patch stage's B/K samples
    # still divide into micro-batches on every data-parallel rank.
    step = (k if use_patch else 1) * inputs.micro_batch_size * (dp or 1)
    token_batch = max(step, round(batch_tokens / inputs.seq_length / step) * step)
    tokens_per_step = token_batch * inputs.seq_length  # the same in both stages
    total_iters = max(1, math.ceil(plan_tokens / tokens_per_step))
    if use_patch:
        # The split pretrain_patch_gpt.py makes of --train-tokens (the runner's command passes it).
        patch_iters, token_iters = stage_iterations(total_iters * tokens_per_step,
                                                    inputs.patch_fraction, tokens_per_step)
        runs = [
            PlannedStage("patch", k, patch_iters * tokens_per_step, token_batch // k, patch_iters, 0,
                     patch_iters * tokens_per_step * fpt_patch),
            PlannedStage("token", 1, token_iters * tokens_per_step, token_batch, token_iters, 0,
                     token_iters * tokens_per_step * fpt_token),
        ]
    else:
        runs = [PlannedStage("token-only", 1, total_iters * tokens_per_step, token_batch, total_iters, 0,
                         total_iters * tokens_per_step * fpt_token)]
    # One warmup for both stages: the runner passes the same flags to each.
    warmup = _warmup(min(run.train_iters for run in runs))
    for run in runs:
        run.warmup_iters = warmup
        if run.train_iters < 200:
            warnings.append(
                f"the {run.name} stage has only {run.train_iters} steps at {tokens_per_step:,} tokens per step; "
                "lower --global-batch-tokens for a usable schedule")
    return token_batch, total_iters, runs


def compute_plan(inputs: PlanInputs) -> ComputePlan:
    validate(inputs)
    fit = chinchilla.LOSS_FITS[inputs.loss_fit]
    warnings: list[str] = []
    assumptions: list[str] = []

    hardware = None
    if inputs.gpus is not None:
        try:
            hardware = make_hardware_budget(inputs.gpus, inputs.hours, inputs.gpu, inputs.mfu)
        except ValueError as err:
            raise PlanningError(str(err)) from None
        if hardware.mfu_source == "assumed":
            assumptions.append(
                f"MFU {hardware.mfu:.0%} is assumed: no MFU measured with our training loop on "
                f"{hardware.gpu_name} is recorded yet (pass --mfu to override)")
    compute = inputs.compute
    if inputs.hours is not None:
        compute = hardware.total_flops

    choice, tokens = _choose_shape_and_tokens(inputs, compute, fit)
    vocab_rows = _padded_vocab(choice, inputs)
    model_shape = choice.model_shape(vocab_rows)
    n = choice.parameters(inputs.vocab_size)
    fpt_token = flops_per_token(model_shape, inputs.seq_length)
    fpt_patch = flops_per_token(model_shape, inputs.seq_length, patch_size=inputs.patch_size)
    token_only_compute = tokens * fpt_token

    lam, k = inputs.patch_fraction, inputs.patch_size
    patch_factor = (lam * fpt_patch + (1 - lam) * fpt_token) / fpt_token
    est_factor = inputs.est_flops_factor if inputs.est else 1.0
    patch_compute = token_only_compute * patch_factor
    more_data_tokens = tokens / patch_factor

    use_patch = k > 1 and lam > 0
    planned_compute = (patch_compute if use_patch else token_only_compute) * est_factor

    reference = {"compute": token_only_compute}
    reference["rule_parameters"], reference["rule_tokens"] = chinchilla.rule_optimal_params_tokens(
        token_only_compute, inputs.tokens_per_parameter)
    reference["fit_parameters"], reference["fit_tokens"] = fit.optimal_params_tokens(token_only_compute)

    dp = _data_parallel_size(choice, inputs.gpus)
    global_batch_size, total_iters, stages = _stage_runs(tokens, choice, inputs, dp, fpt_token, fpt_patch,
                                                         warnings)

    assumptions.append(
        "budgets are spent with our architecture's exact per-token training FLOPs "
        f"({fpt_token:.3g} per token here, vs Chinchilla's 6N = {6 * n:.3g})")
    assumptions.append(
        f"predicted loss uses {fit.source}; it is in that fit's units (nats/token on "
        "Chinchilla's data), useful to compare plans, not as a target on other data")
    if use_patch:
        assumptions.append(
            f"patch-level (K={k}, λ={lam:.3g}) reaches token-only quality on the same tokens "
            f"(measured by the paper at K=4, λ≤2/3, 370M-2.7B, 360B tokens; no scaling law in K, λ "
            "was found, and with little data it was slightly worse)")
        if lam > 2 / 3 + 1e-9 or k > 4:
            warnings.append(f"K={k}, λ={lam:.3g} lies outside what the paper found lossless (K≤4, λ≤2/3)")
        if tokens / n < 150:
            warnings.append(
                f"{tokens / n:.0f} tokens/parameter: the paper's patch-level gains were measured at "
                "~1000 (370M on 360B tokens); with less data (370M on 45B, ~120 per parameter) "
                "patch-level was slightly worse than token-only")
    elif k > 1 or lam > 0:
        assumptions.append("K=1 or λ=0: no patch stage, token-only training")
    if inputs.est:
        assumptions.append(
            f"EST costs {est_factor:.0%} of full training at equal quality (published: 25.0-26.7% "
            "saved); its combination with patch-level training is assumed multiplicative and is untested")
    if choice in (SHAPE_TABLE[0], SHAPE_TABLE[-1]):
        warnings.append(f"the plan sits at the {'small' if choice is SHAPE_TABLE[0] else 'large'} "
                        "end of the shape table; the optimum may lie beyond it")

    return ComputePlan(
        inputs=inputs,
        shape=choice,
        parameters=n,
        non_embedding_parameters=choice.model_shape(inputs.vocab_size).parameter_count(include_embeddings=False),
        padded_vocab_size=vocab_rows,
        flops_per_token_token_stage=fpt_token,
        flops_per_token_patch_stage=fpt_patch,
        six_n=6.0 * n,
        tokens=tokens,
        tokens_per_parameter=tokens / n,
        token_only_compute=token_only_compute,
        predicted_loss=fit.loss(n, tokens),
        loss_fit_source=fit.source,
        patch_cost_factor=patch_factor,
        patch_compute=patch_compute,
        patch_saved_compute=token_only_compute - patch_compute,
        more_data_tokens=more_data_tokens,
        more_data_predicted_loss=fit.loss(n, more_data_tokens),
        est_flops_factor=est_factor,
        planned_compute=planned_compute,
        chinchilla_reference=reference,
        hardware=hardware,
        data_parallel_size=dp,
        global_batch_size=global_batch_size,
        total_iters=total_iters,
        stages=stages,
        assumptions=assumptions,
        warnings=warnings,
    )
