"""The patch-level GPT model on megatron-core."""
