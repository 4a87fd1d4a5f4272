"""Evolving Subnetwork Training (EST) for PatchGPTModel, composable with patch-level training."""
