"""EST's staged schedule: which sampling rates hold at which point of a run.

A run of N iterations is cut at fractions ``stage_ends`` (increasing, in
(0, 1)). Stage j < len(stage_ends) samples layers, attention heads and MLP
units at its rates; after the last boundary the full model trains. The
paper's three stages are ``stage_ends=(a, b)`` with layer rate < 1 in the
first stage and 1 in the second.
"""

from __future__ import annotations

from dataclasses import dataclass

GQA_SAMPLING_MODES = ("groups", "heads")


@dataclass(frozen=True)
class StageRates:
    """Kept rates of one stage: p_L (layers), p_H (attention heads), p_M (MLP units)."""

    layers: float = 1.0
    heads: float = 1.0
    mlp_units: float = 1.0

    def __post_init__(self):
        for name in ("layers", "heads", "mlp_units"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"EST {name} rate must lie in (0, 1], got {value!r}")

    @property
    def is_full(self) -> bool:
        return self.layers == 1.0 and self.heads == 1.0 and self.mlp_units == 1.0


FULL_RATES = StageRates()


@dataclass(frozen=True)
class ESTConfig:
    """Evolving Subnetwork Training, off unless ``enabled``.

    ``stage_ends[j]`` is the fraction of the run at which sampled stage j
    ends; ``layer_rates``/``head_rates``/``mlp_rates`` hold one rate per
    sampled stage. ``gqa_sampling``: "groups" drops whole query groups (their
    query heads with their key/value head, so K/V projections shrink too);
    "heads" keeps every group and samples the same number of query heads in
    each. With multi-head attention (one head per group) both are the same.
    ``seed`` seeds the mask generator together with the iteration.
    """

    enabled: bool = False
    stage_ends: tuple[float, ...] = (0.25, 0.5)
    layer_rates: tuple[float, ...] = (0.5, 1.0)
    head_rates: tuple[float, ...] = (0.5, 0.5)
    mlp_rates: tuple[float, ...] = (0.5, 0.5)
    gqa_sampling: str = "groups"
    seed: int = 1234

    def __post_init__(self):
        n = len(self.stage_ends)
        for name in ("layer_rates", "head_rates", "mlp_rates"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"EST needs one {name.replace('_', ' ')[:-1]} per sampled stage: "
                    f"{n} stage ends {self.stage_ends} but {name}={getattr(self, name)}"
                )
        ends = (0.0, *self.stage_ends, 1.0)
        if any(not a < b for a, b in zip(ends, ends[1:])):
            raise ValueError(
                f"EST stage ends must increase strictly inside (0, 1), got {self.stage_ends}; "
                "the last stage (the full model) runs from the last end to the end of the run"
            )
        if self.gqa_sampling not in GQA_SAMPLING_MODES:
            raise ValueError(f"EST GQA sampling must be one of {GQA_SAMPLING_MODES}, "
                             f"got {self.gqa_sampling!r}")
        self.stages  # validates every rate

    @property
    def stages(self) -> tuple[StageRates, ...]:
        """Rates of the sampled stages, then the full model's."""
        sampled = tuple(StageRates(l, h, m) for l, h, m in
                        zip(self.layer_rates, self.head_rates, self.mlp_rates))
        return sampled + (FULL_RATES,)

    def stage_index(self, iteration: int, train_iters: int) -> int:
        """Stage of 1-based ``iteration`` of ``train_iters``: by the run fraction done before it."""
        if train_iters < 1 or not 1 <= iteration <= train_iters:
            raise ValueError(f"iteration {iteration} is outside a run of {train_iters} iterations")
        done = (iteration - 1) / train_iters
        for j, end in enumerate(self.stage_ends):
            if done < end:
                return j
        return len(self.stage_ends)

    def rates(self, iteration: int, train_iters: int) -> StageRates:
        if not self.enabled:
            return FULL_RATES
        return self.stages[self.stage_index(iteration, train_iters)]

    def describe(self, train_iters: int | None = None) -> str:
        """One line per stage, printed at start-up."""
        if not self.enabled:
            return "EST: off (the full model trains every step)"
        lines = [f"EST: evolving subnetwork training, GQA sampling by {self.gqa_sampling}, "
                 f"mask seed {self.seed}"]
        starts = (0.0, *self.stage_ends)
        ends = (*self.stage_ends, 1.0)
        for j, (start, end, rates) in enumerate(zip(starts, ends, self.stages)):
            span = f"{start:.0%}-{end:.0%} of the run"
            if train_iters:
                first = next((i for i in range(1, train_iters + 1)
                              if self.stage_index(i, train_iters) == j), None)
                last = max((i for i in range(1, train_iters + 1)
                            if self.stage_index(i, train_iters) == j), default=None)
                span += f" (iterations {first}-{last})" if first else " (no iterations)"
            what = ("full model" if rates.is_full else
                    f"layers {rates.layers:g}, heads {rates.heads:g}, MLP units {rates.mlp_units:g}")
            lines.append(f"  stage {j + 1}: {span}: {what}")
        return "\n".join(lines)
