"""Checkpoint conversion: patch stage -> token stage, and to/from Hugging Face Llama.

All conversions go through one canonical form: the *full weights*, a dict of
unsharded tensors named like megatron's TP=1/PP=1 state dict with global
layer numbers (``decoder.layers.3.mlp.linear_fc1.weight``), beside a
:class:`~patch_megatron.conversion.model_description.ModelDescription`.
Megatron checkpoints are read into and written from that form with
megatron-core's own dist_checkpointing (which reshards across TP/PP by
itself); Hugging Face directories are mapped to and from it by
:mod:`~patch_megatron.conversion.llama_layout`.
"""
