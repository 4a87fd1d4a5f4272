"""Turning GPUs × hours into FLOPs: per-GPU peaks and model FLOPs utilisation.

The presets (H100, H200, A100) are the SXM parts the planner sizes runs for.
The training loop instead reads the name CUDA reports for the device it runs
on, where the PCIe and NVL boards of the same name have lower clocks. Both
tables live in ``patch_megatron.flops`` (``peak_tflops_of_gpu``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from patch_megatron.flops import GPU_PEAK_BF16_TFLOPS

# MFU this project has measured with its own training loop, per GPU preset,
# counted with patch_megatron.flops. Record a number here (with the run it
# came from) once a benchmark exists; until then the planner uses
# ASSUMED_MFU and says so in its output.
MEASURED_MFU: dict[str, float] = {}

# Stated assumption when nothing is measured: a typical well-tuned dense
# Megatron run on H100-class GPUs reaches 35-45% MFU at these model sizes.
ASSUMED_MFU = 0.40


@dataclass(frozen=True)
class HardwareBudget:
    gpus: int
    hours: Optional[float]  # None: only the rate is known (hours are then an output)
    peak_tflops_per_gpu: float
    mfu: float
    gpu_name: str  # preset name, or "custom"
    mfu_source: str  # "measured", "assumed" or "given"

    @property
    def sustained_flops_per_second(self) -> float:
        """Model FLOP/s of the whole allocation."""
        return self.gpus * self.peak_tflops_per_gpu * 1e12 * self.mfu

    @property
    def total_flops(self) -> float:
        if self.hours is None:
            raise ValueError("this hardware budget has no --hours, so it has no total FLOPs")
        return self.sustained_flops_per_second * self.hours * 3600.0

    def hours_for(self, flops: float) -> float:
        """Wall-clock hours this allocation needs for ``flops``."""
        return flops / self.sustained_flops_per_second / 3600.0


def resolve_peak(gpu: str) -> tuple[str, float]:
    """A preset name (H100, H200, A100; any case) or a number in TFLOP/s."""
    key = gpu.strip().upper()
    if key in GPU_PEAK_BF16_TFLOPS:
        return key, GPU_PEAK_BF16_TFLOPS[key]
    try:
        peak = float(gpu)
    except ValueError:
        presets = ", ".join(sorted(GPU_PEAK_BF16_TFLOPS))
        raise ValueError(
            f"unknown GPU {gpu!r}: use a preset ({presets}) or a bf16 peak in TFLOP/s, e.g. --gpu 700"
        ) from None
    if not peak > 0:
        raise ValueError(f"GPU peak must be a positive number of TFLOP/s, got {gpu!r}")
    return "custom", peak


def default_mfu(gpu_name: str) -> tuple[float, str]:
    """Our measured MFU for this GPU if recorded, else the stated assumption."""
    if gpu_name in MEASURED_MFU:
        return MEASURED_MFU[gpu_name], "measured"
    return ASSUMED_MFU, "assumed"


def make_hardware_budget(gpus: int, hours: Optional[float] = None, gpu: str = "H100",
                         mfu: Optional[float] = None) -> HardwareBudget:
    if not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"--gpus must be a positive integer, got {gpus!r}")
    if hours is not None and not hours > 0:
        raise ValueError(f"--hours must be positive, got {hours!r}")
    gpu_name, peak = resolve_peak(gpu)
    if mfu is None:
        mfu, source = default_mfu(gpu_name)
    else:
        source = "given"
    if not 0.0 < mfu <= 1.0:
        raise ValueError(
            f"MFU {mfu!r} is impossible: it is a fraction of the GPU's peak, so it must lie in (0, 1] "
            f"(e.g. --mfu 0.4 for 40%)"
        )
    return HardwareBudget(gpus=gpus, hours=None if hours is None else float(hours), peak_tflops_per_gpu=peak, mfu=float(mfu),
                          gpu_name=gpu_name, mfu_source=source)
