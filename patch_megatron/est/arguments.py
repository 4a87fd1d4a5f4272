"""EST's command-line flags (off by default) and the ESTConfig they make."""

from __future__ import annotations

import argparse

from patch_megatron.est.schedule import ESTConfig, GQA_SAMPLING_MODES

_DEFAULTS = ESTConfig()


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _show(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def add_est_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group(
        "evolving subnetwork training (EST, Li et al. 2024; off unless --est)",
        "Each step trains a sampled subnetwork: a subset of layers (the rest pass their input "
        "through), and inside them a subset of attention heads and MLP units, scaled by 1/p. "
        "Stages end at the given fractions of this run; after the last one the full model "
        "trains. Evaluation always uses the full model.")
    g.add_argument("--est", action="store_true",
                   help="train sampled subnetworks in the early stages of this run")
    g.add_argument("--est-stage-ends", type=_fractions, default=_DEFAULTS.stage_ends,
                   metavar="F1,F2,...",
                   help="run fractions at which the sampled stages end (default "
                        f"{_show(_DEFAULTS.stage_ends)}; the full model trains after the last)")
    g.add_argument("--est-layer-rates", type=_fractions, default=_DEFAULTS.layer_rates,
                   metavar="P1,P2,...",
                   help="fraction of layers kept per sampled stage (default "
                        f"{_show(_DEFAULTS.layer_rates)}); each pipeline stage keeps the same count")
    g.add_argument("--est-head-rates", type=_fractions, default=_DEFAULTS.head_rates,
                   metavar="P1,P2,...",
                   help=f"fraction of attention heads kept per sampled stage (default "
                        f"{_show(_DEFAULTS.head_rates)})")
    g.add_argument("--est-mlp-rates", type=_fractions, default=_DEFAULTS.mlp_rates,
                   metavar="P1,P2,...",
                   help=f"fraction of MLP hidden units kept per sampled stage (default "
                        f"{_show(_DEFAULTS.mlp_rates)})")
    g.add_argument("--est-gqa-sampling", choices=GQA_SAMPLING_MODES, default=_DEFAULTS.gqa_sampling,
                   help="grouped-query attention: drop whole query groups with their K/V head "
                        "(groups, default) or sample query heads inside every group (heads)")
    g.add_argument("--est-seed", type=int, default=None,
                   help="seed of the mask generator (default: --seed); masks depend only on it "
                        "and the iteration, so every rank and a resumed run draw the same ones")
    return parser


def est_config_from_args(args) -> ESTConfig:
    """ESTConfig from parsed flags; raises ValueError with the flag names on bad values."""
    try:
        return ESTConfig(
            enabled=bool(args.est),
            stage_ends=tuple(args.est_stage_ends),
            layer_rates=tuple(args.est_layer_rates),
            head_rates=tuple(args.est_head_rates),
            mlp_rates=tuple(args.est_mlp_rates),
            gqa_sampling=args.est_gqa_sampling,
            seed=args.est_seed if args.est_seed is not None else getattr(args, "seed", 1234),
        )
    except ValueError as error:
        raise ValueError(f"--est flags: {error}") from None
