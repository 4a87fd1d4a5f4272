"""megatron-core's rerun state machine, wired as Megatron-LM wires it (``--rerun-mode``).

The machine (``megatron.core.rerun_state_machine``) validates results during a
step: here each micro-batch's loss (NaN, Inf, ``--check-for-spiky-loss``) and,
through megatron-core's DDP, each gradient bucket's norm. A rejected result
makes ``train_step`` run the step's forward and backward again on the same
micro-batches (the data iterator replays them) with the same RNG states. Its
verdict is Megatron-LM's:

* not reproduced and not fatal: the step goes on with the rerun's result;
* not reproduced and fatal (a transient fault): a checkpoint of the weights
  before the step is saved and the run exits 17;
* reproduced and fatal: a checkpoint holding the machine's state is saved and
  the run exits 16 ("resume to disambiguate"); resumed on another GPU, the
  step is rerun there once more to tell a faulty GPU from a correct, if
  unwelcome, result (both exit 17); resumed on the same GPU, it exits 16
  again without saving.

What this project adds is the policy for NaN/Inf (``--nan-action``): with
``skip`` the NaN/Inf validations are not fatal and the loop skips the update;
with ``--rerun-mode disabled`` the loop's own checks stop the run with the
iteration named, where Megatron-LM raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

SPIKY_LOSS_FACTOR = 10  # Megatron-LM's pretrain_gpt.py: a loss 10x the largest so far is spiky
# The machine's ShardedObject key and its entry in common.pt, as Megatron-LM names them.
SHARDED_KEY = "rerun_state_machine_state"
COMMON_KEY = "rerun_state_machine"


class RerunExit(Exception):
    """The machine ended the run after a rerun: exit with ``code`` (16 or 17)."""

    def __init__(self, code: int, saved: bool, iteration: int):
        self.code, self.saved, self.iteration = code, saved, iteration
        super().__init__(
            f"the rerun state machine ends the run at iteration {iteration} with exit code {code}"
            + (" after saving a checkpoint" if saved else ""))


@dataclass(frozen=True)
class LossChecks:
    """Which validations ``loss_func`` asks of the machine for each micro-batch."""

    nan_and_inf: bool
    nan_is_fatal: bool
    spiky: bool

    @classmethod
    def of(cls, args) -> "LossChecks | None":
        if args.rerun_mode == "disabled":
            return None  # the loop's own NaN checks apply
        return cls(nan_and_inf=True, nan_is_fatal=args.nan_action == "stop",
                   spiky=args.check_for_spiky_loss)


def grad_checks(args) -> dict:
    """megatron-core DDP's per-bucket gradient validations (its DistributedDataParallelConfig).

    As in Megatron-LM, NaN/Inf gradients are validated when the loss is; they are always fatal
    there, so with --nan-action skip the loop's own check (after the reduction) skips the step.
    With --fp16 an overflowing gradient is the dynamic loss scaler's to skip (Megatron-LM's fp16
    functional tests record such skipped steps at the start of their runs, not reruns).
    """
    nan_checks = args.rerun_mode != "disabled" and args.nan_action == "stop" and not args.fp16
    return {"check_for_nan_in_grad": nan_checks,
            "check_for_large_grads": args.check_for_large_grads}


def initialize(args) -> None:
    """Start the machine (megatron-core keeps one per process) for this run's flags."""
    from megatron.core import tensor_parallel
    from megatron.core.rerun_state_machine import (
        RerunDiagnostic, RerunErrorInjector, RerunMode, destroy_rerun_state_machine,
        initialize_rerun_state_machine,
    )

    # Besides the RNG states the machine saves itself, the tensor-parallel RNG tracker's
    # (dropout inside tensor-parallel regions), as Megatron-LM adds.
    def save_tracker():
        return {"rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}

    def restore_tracker(saved):
        tensor_parallel.get_cuda_rng_tracker().set_states(saved["rng_tracker_states"])

    destroy_rerun_state_machine()
    mode = "report_determinism_stats" if args.rerun_mode == "report_stats" else args.rerun_mode
    initialize_rerun_state_machine(
        state_save_func=save_tracker,
        state_restore_func=restore_tracker,
        mode=RerunMode(mode),
        error_injector=RerunErrorInjector(
            error_injection_rate=args.error_injection_rate,
            error_injection_type=RerunDiagnostic(args.error_injection_type)),
        result_rejected_tracker_filename=args.result_rejected_tracker_filename,
    )


def machine():
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    return get_rerun_state_machine()


def replayable(batches):
    """The step's micro-batch iterator, able to replay a step's micro-batches for a rerun."""
    from megatron.core.rerun_state_machine import RerunDataIterator

    return RerunDataIterator(batches)


def validate_loss(loss: torch.Tensor, checks: LossChecks) -> None:
    """Megatron-LM's validations of one micro-batch's summed loss (pretrain_gpt.py's loss_func)."""
    m = machine()
    if checks.nan_and_inf:
        m.validate_result(result=loss, rejection_func=torch.isnan,
                          message="found NaN in local forward loss calculation",
                          tolerance=0.0, fatal=checks.nan_is_fatal)
        m.validate_result(result=loss, rejection_func=torch.isinf,
                          message="found Inf in local forward loss calculation",
                          tolerance=0.0, fatal=checks.nan_is_fatal)
    if checks.spiky:
        m.validate_result(result=loss,
                          rejection_func=partial(m.is_unexpectedly_large,
                                                 threshold=SPIKY_LOSS_FACTOR, context="loss"),
                          message="Spiky loss", tolerance=0.0, fatal=False)


# ---------------------------------------------------------------------------
# The machine's state in a checkpoint: saved only when a rerun asked for the checkpoint, in
# plain values (what a checkpoint loads with weights_only=True).

def common_state() -> dict | None:
    """common.pt's entry: the machine's mode and state (the same on every rank), or None.

    Only a checkpoint taken for a rerun on another GPU holds it; the one saved after a
    transient fault resumes as any other (the state it would hold cannot be resumed)."""
    from megatron.core.rerun_state_machine import RerunState

    m = machine()
    if m.state != RerunState.WILL_RERUN_FROM_CHECKPOINT:
        return None
    return {"mode": m.mode.value, "state": m.state.name, "current_iteration": m.current_iteration}


def rank_state() -> dict:
    """This rank's part of the machine's state (which validation failed here, and how)."""
    m = machine()
    call = m.failed_validation_call
    injector = m.error_injector
    result = m.initial_result
    return {
        "rerun_requested": m.rerun_requested,
        "checkpoint_requested": m.checkpoint_requested,
        "restart_again_requested": m.restart_again_requested,
        "continue_requested": m.continue_requested,
        "error_injection_rate": injector.error_injection_rate,
        "error_injection_type": injector.error_injection_type.value,
        "injected_error_type": (injector.injected_error_type.value
                                if injector.injected_error_type is not None else None),
        "failed_validation_call": (None if call is None else
                                   [call.caller.message, call.caller.rank, call.sequence]),
        "initial_result": (result.detach().cpu() if isinstance(result, torch.Tensor) else result),
        "suspicious_node": m.suspicious_node,
        "suspicious_device": (None if m.suspicious_device is None else str(m.suspicious_device)),
        "large_value_counts": dict(m.large_value_counts),
        "max_values": {k: float(v) for k, v in m.max_values.items()},
    }


def sharded_object(world_size: int, rank: int, state: dict | None):
    """The ShardedObject that holds (or, loading, receives) every rank's part."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(SHARDED_KEY, state, (world_size,), (rank,))


def load(common: dict, ranks_part: dict) -> bool:
    """Give the machine a checkpoint's state; False when --rerun-mode disabled ignores it."""
    from megatron.core.rerun_state_machine import (
        Call, Caller, RerunDiagnostic, RerunMode, RerunState,
    )

    m = machine()
    if m.mode == RerunMode.DISABLED:
        return False
    part = dict(ranks_part)
    call = part.pop("failed_validation_call")
    injected = part.pop("injected_error_type")
    device = part.pop("suspicious_device")
    sharded = {
        **{k: part[k] for k in ("rerun_requested", "checkpoint_requested",
                                "restart_again_requested", "continue_requested",
                                "initial_result", "suspicious_node", "large_value_counts",
                                "max_values")},
        "error_injector_checkpoint": {
            "error_injection_rate": part["error_injection_rate"],
            "error_injection_type": RerunDiagnostic(part["error_injection_type"]),
            "injected_error_type": None if injected is None else RerunDiagnostic(injected),
        },
        "failed_validation_call": (None if call is None else
                                   Call(caller=Caller(message=call[0], rank=call[1]),
                                        sequence=call[2])),
        "suspicious_device": (None if device is None else
                              int(device) if device.isdigit() else device),
        "data_iterator_checkpoints": None,  # the resumed run reads the same micro-batches
    }
    m.load_state_dict({"mode": RerunMode(common["mode"]), "state": RerunState[common["state"]],
                       "current_iteration": common["current_iteration"], "sharded": sharded})
    return True
