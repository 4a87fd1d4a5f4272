"""EST in a training loop: pick the step's subnetwork, set it on the model, count what it saved.

    est = SubnetworkTraining(config, shape, layout, train_iters)
    for iteration in range(start + 1, train_iters + 1):
        kept = est.set_step(model_chunks, iteration)      # before forward-backward
        ... forward-backward, optimizer step ...
        est.record(iteration, seconds)                    # FLOPs and time of the step
    print(est.summary())

Evaluation needs nothing: the EST modules run the full model whenever the
model is in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from patch_megatron import flops
from patch_megatron.est.modules import SubnetTransformerLayer
from patch_megatron.est.sampler import Layout, Subnetwork, check_layout, sample_subnetwork
from patch_megatron.est.schedule import ESTConfig
from patch_megatron.model.shape import ModelShape


def apply_subnetwork(model_chunks, subnetwork: Subnetwork | None) -> int:
    """Set each EST layer of these chunks (DDP-wrapped or not) to its part of the global mask.

    ``None`` restores the full model. Returns how many layers were set, and
    refuses a model without EST layers rather than silently training it full.
    """
    if not isinstance(model_chunks, (list, tuple)):
        model_chunks = [model_chunks]
    count = 0
    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, SubnetTransformerLayer):
                index = module.layer_number - 1  # global, pipeline offset included
                if subnetwork is None:
                    module.set_choice(_FULL_CHOICE)
                else:
                    if index >= len(subnetwork.layers):
                        raise ValueError(f"mask covers {len(subnetwork.layers)} layers, "
                                         f"the model has layer {index + 1}")
                    module.set_choice(subnetwork.layers[index])
                count += 1
    if count == 0 and any(sum(1 for _ in c.parameters()) for c in model_chunks):
        raise ValueError("the model has no EST layers: build it with "
                         "layer_spec=subnetwork_block_spec (patch_megatron.est.spec) to use EST")
    return count


class _FullChoice:
    heads = None
    units = None


_FULL_CHOICE = _FullChoice()


@dataclass
class StepRecord:
    flops: float
    full_flops: float
    seconds: float
    full_model: bool


@dataclass
class SubnetworkTraining:
    """The schedule and sampler bound to one run's shape, layout and length."""

    config: ESTConfig
    shape: ModelShape
    layout: Layout
    train_iters: int
    records: list[StepRecord] = field(default_factory=list)

    def __post_init__(self):
        if self.config.enabled:
            check_layout(self.shape, self.layout, self.config.gqa_sampling)

    def subnetwork(self, iteration: int) -> Subnetwork:
        """The global mask of 1-based ``iteration``: a function of (seed, iteration) only."""
        rates = self.config.rates(iteration, self.train_iters)
        return sample_subnetwork(rates, self.shape, self.layout, self.config.seed, iteration,
                                 self.config.gqa_sampling)

    def set_step(self, model_chunks, iteration: int) -> flops.KeptFractions:
        """Set ``iteration``'s subnetwork on the model; return its kept fractions for FLOPs."""
        if not self.config.enabled:
            return flops.FULL_MODEL
        subnetwork = self.subnetwork(iteration)
        apply_subnetwork(model_chunks, subnetwork)
        return subnetwork.kept_fractions(self.shape)

    def kept_fractions(self, iteration: int) -> flops.KeptFractions:
        if not self.config.enabled:
            return flops.FULL_MODEL
        return self.subnetwork(iteration).kept_fractions(self.shape)

    def record(self, step_flops: float, full_flops: float, seconds: float, iteration: int) -> None:
        """One finished step: its real FLOPs, the full model's, and its wall-clock seconds."""
        full = not self.config.enabled or self.config.rates(iteration, self.train_iters).is_full
        self.records.append(StepRecord(step_flops, full_flops, seconds, full))

    def summary(self) -> str:
        """FLOPs saved against the full model, and wall-clock saved, reported separately.

        Wall-clock saved compares the run's step time with the full model's
        step time measured in this run's full-model stage (its median), so it
        is only reported when that stage ran at least a few steps.
        """
        if not self.records:
            return "EST: no steps recorded"
        done = sum(r.flops for r in self.records)
        full = sum(r.full_flops for r in self.records)
        line = (f"EST summary: {len(self.records)} steps, {done:.4g} FLOPs trained vs {full:.4g} "
                f"for the full model: FLOPs saved {1 - done / full:.1%}")
        full_times = sorted(r.seconds for r in self.records if r.full_model)
        if len(full_times) >= 3:
            median = full_times[len(full_times) // 2]
            seconds = sum(r.seconds for r in self.records)
            estimate = median * len(self.records)
            line += (f"; wall-clock {seconds:.1f} s vs {estimate:.1f} s estimated for the full "
                     f"model (median full-model step {median * 1000:.1f} ms): wall-clock saved "
                     f"{1 - seconds / estimate:.1%}")
        else:
            line += "; wall-clock saved: not measured (fewer than 3 full-model steps in this run)"
        return line
