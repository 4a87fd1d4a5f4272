"""Evolving Subnetwork Training (EST) for PatchGPTModel, composable with patch-level training."""

from patch_megatron.lazy_exports import exports

# Imported on first use (PEP 562): control and modules pull in megatron-core, while the
# flag parser needs only the arguments, the schedule and the sampler's layout checks.
_HOMES = {
    "add_est_args": "arguments", "est_config_from_args": "arguments",
    "SubnetworkTraining": "control", "apply_subnetwork": "control",
    "LayerChoice": "sampler", "Layout": "sampler",
    "Subnetwork": "sampler", "sample_subnetwork": "sampler",
    "ESTConfig": "schedule", "StageRates": "schedule",
}

__getattr__ = exports(__name__, _HOMES)

__all__ = [
    "ESTConfig", "LayerChoice", "Layout", "StageRates", "Subnetwork",
    "SubnetworkTraining", "add_est_args", "apply_subnetwork",
    "est_config_from_args", "sample_subnetwork",
]
