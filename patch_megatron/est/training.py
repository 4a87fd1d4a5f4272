"""EST in pretrain_patch_gpt.py's loop: the controller for this run's stage, from the flags."""

from __future__ import annotations

from patch_megatron.est.arguments import est_config_from_args
from patch_megatron.est.control import SubnetworkTraining
from patch_megatron.est.sampler import Layout


def loop_controller(args, plan, model_shape, print_fn=print) -> SubnetworkTraining | None:
    """The EST controller of this stage's run, its schedule printed; None without --est.

    The schedule's fractions are of this run (this stage's ``train_iters``):
    a patch stage and the token stage after it each run their own EST stages
    when both get --est.
    """
    if not getattr(args, "est", False):
        return None
    control = SubnetworkTraining(
        config=est_config_from_args(args),
        shape=model_shape,
        layout=Layout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size),
        train_iters=plan.train_iters,
    )
    print_fn(control.config.describe(plan.train_iters))
    return control
