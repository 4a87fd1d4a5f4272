"""Drawing one step's subnetwork: a global mask, the same on every rank.

The mask is a pure function of (seed, iteration, rates, model shape, TP and
PP sizes): a dedicated ``torch.Generator`` is seeded from a hash of (seed,
iteration), so every rank draws the same mask without communicating, a
resumed run draws the masks it would have drawn, and the dropout/init RNG
streams are never touched.

Sampling is stratified by the parallel layout, so that the work stays
balanced and the collectives match:

* layers: every pipeline stage keeps ``round(p_L * layers_per_stage)`` (at
  least one) of its layers, so no stage is ever empty and stages stay equally
  loaded;
* heads: each tensor-parallel shard keeps the same number of its query
  groups ("groups" mode), or every group keeps the same number of its query
  heads ("heads" mode);
* MLP units: each tensor-parallel shard keeps the same number of its units.

The scale factors are the exact kept fractions (kept count / total), which is
the inverted-dropout scale of sampling a fixed-size subset uniformly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from patch_megatron.est.schedule import StageRates
from patch_megatron.flops import KeptFractions
from patch_megatron.model.shape import ModelShape


@dataclass(frozen=True)
class Layout:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1


@dataclass(frozen=True)
class LayerChoice:
    """What runs inside one kept layer: sorted global indices, None for "all"."""

    heads: tuple[int, ...] | None = None  # query heads, numbered group-major (megatron's order)
    units: tuple[int, ...] | None = None  # MLP hidden units (each is a gate row and an up row)


@dataclass(frozen=True)
class Subnetwork:
    """One step's global mask: ``layers[i]`` is None when layer i is skipped."""

    layers: tuple[LayerChoice | None, ...]

    @staticmethod
    def full(num_layers: int) -> "Subnetwork":
        return Subnetwork(tuple(LayerChoice() for _ in range(num_layers)))

    @property
    def is_full(self) -> bool:
        return all(c is not None and c.heads is None and c.units is None for c in self.layers)

    def kept_fractions(self, shape: ModelShape) -> KeptFractions:
        """Fractions for patch_megatron.flops: exact, because kept layers keep equal counts."""
        kept = [c for c in self.layers if c is not None]
        if not kept:
            raise ValueError("a subnetwork must keep at least one layer")
        heads = {len(c.heads) if c.heads is not None else shape.num_attention_heads for c in kept}
        units = {len(c.units) if c.units is not None else shape.ffn_hidden_size for c in kept}
        groups = {len({h // shape.heads_per_group for h in c.heads}) if c.heads is not None
                  else shape.num_query_groups for c in kept}
        if len(heads) > 1 or len(units) > 1 or len(groups) > 1:
            raise ValueError("kept layers of one subnetwork must keep equal head and unit counts")
        return KeptFractions(
            layers=len(kept) / shape.num_layers,
            attention_heads=heads.pop() / shape.num_attention_heads,
            mlp_units=units.pop() / shape.ffn_hidden_size,
            query_groups=groups.pop() / shape.num_query_groups,
        )


def mask_generator(seed: int, iteration: int) -> torch.Generator:
    """A CPU generator for (seed, iteration): stable across processes and Python versions."""
    digest = hashlib.sha256(f"est-mask:{seed}:{iteration}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def kept_count(rate: float, total: int) -> int:
    """Members kept of ``total`` at ``rate``: rounded, at least one."""
    return max(1, min(total, round(rate * total)))


def _choose(generator: torch.Generator, offset: int, total: int, count: int) -> list[int]:
    return sorted(offset + int(i) for i in torch.randperm(total, generator=generator)[:count])


def _stratified(generator, total: int, strata: int, rate: float) -> tuple[int, ...] | None:
    """``rate`` of ``total`` members, the same count from each of ``strata`` equal blocks."""
    per_block = total // strata
    count = kept_count(rate, per_block)
    if count == per_block:
        return None
    return tuple(i for b in range(strata) for i in _choose(generator, b * per_block, per_block, count))


def check_layout(shape: ModelShape, layout: Layout, gqa_sampling: str) -> None:
    """Refuse layouts where equal per-rank counts are impossible; say what to change."""
    tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    if shape.num_layers % pp:
        raise ValueError(f"{shape.num_layers} layers do not split over {pp} pipeline stages")
    if shape.num_query_groups % tp:
        raise ValueError(
            f"EST needs whole query groups on each tensor-parallel rank: {shape.num_query_groups} "
            f"groups over TP {tp} (megatron's replicated-KV layout is not supported with EST)"
        )
    if shape.ffn_hidden_size % tp:
        raise ValueError(f"ffn hidden size {shape.ffn_hidden_size} does not split over TP {tp}")


def sample_subnetwork(rates: StageRates, shape: ModelShape, layout: Layout, seed: int,
                      iteration: int, gqa_sampling: str = "groups") -> Subnetwork:
    """The global mask of ``iteration``; the full model when every rate is 1."""
    check_layout(shape, layout, gqa_sampling)
    if rates.is_full:
        return Subnetwork.full(shape.num_layers)
    generator = mask_generator(seed, iteration)
    tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    per_stage = shape.num_layers // pp
    keep_per_stage = kept_count(rates.layers, per_stage)
    kept_layers = {i for s in range(pp) for i in _choose(generator, s * per_stage, per_stage, keep_per_stage)}
    q = shape.heads_per_group
    layers = []
    for i in range(shape.num_layers):
        if i not in kept_layers:
            layers.append(None)
            continue
        if gqa_sampling == "groups" or q == 1:  # with one head per group both modes coincide
            groups = _stratified(generator, shape.num_query_groups, tp, rates.heads)
            heads = None if groups is None else tuple(g * q + j for g in groups for j in range(q))
        else:
            per_group = kept_count(rates.heads, q)
            heads = None if per_group == q else tuple(
                h for g in range(shape.num_query_groups) for h in _choose(generator, g * q, q, per_group))
        units = _stratified(generator, shape.ffn_hidden_size, tp, rates.mlp_units)
        layers.append(LayerChoice(heads=heads, units=units))
    return Subnetwork(tuple(layers))
