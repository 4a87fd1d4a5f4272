"""Evolving Subnetwork Training (EST) for PatchGPTModel, composable with patch-level training."""

from patch_megatron.est.arguments import add_est_args, est_config_from_args
from patch_megatron.est.control import SubnetworkTraining, apply_subnetwork, attention_shape
from patch_megatron.est.sampler import AttentionShape, LayerChoice, Layout, Subnetwork, sample_subnetwork
from patch_megatron.est.schedule import ESTConfig, StageRates

__all__ = [
    "AttentionShape", "ESTConfig", "LayerChoice", "Layout", "StageRates", "Subnetwork",
    "SubnetworkTraining", "add_est_args", "apply_subnetwork", "attention_shape",
    "est_config_from_args", "sample_subnetwork",
]
