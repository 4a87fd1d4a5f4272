"""A megatron checkpoint of ours -> a Hugging Face ``LlamaForCausalLM`` directory."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patch_megatron.conversion import hf_config, hf_tokenizer, llama_layout, megatron_checkpoint, vocab
from patch_megatron.conversion.errors import ConversionError
from patch_megatron.conversion.output_dir import check_target, publish_directory
from patch_megatron.conversion.safetensors_io import parse_size, write_weights

DEFAULT_MAX_SHARD_SIZE = "5GB"


@dataclass
class ExportOptions:
    load: str
    output: str
    iteration: int | None = None
    tokenizer_model: str | None = None
    vocab_size: int | None = None
    dtype: torch.dtype | None = None  # None: the checkpoint's
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE
    allow_patch_stage: bool = False
    force: bool = False


def refuse_patch_stage(checkpoint, allowed: bool) -> None:
    K = checkpoint.description.patch_size
    if K > 1 and not allowed:
        raise ConversionError(
            f"{checkpoint.path} is a patch-stage checkpoint (patch size {K}): its weights were "
            "trained to predict the next K tokens from patch embeddings and are meant to be "
            "continued with K=1 (the token stage), not served as a token-level model. Convert it "
            "with tools/convert_patch_to_token.py, train the token stage, and export that; or pass "
            "--allow-patch-stage to export these weights anyway")


# Architecture options LlamaForCausalLM has no place for: why, named by the flag that set them.
_NO_LLAMA_COUNTERPART = {
    "qk_layernorm": "LlamaForCausalLM has no query/key norms, so the weights of --qk-layernorm "
                    "would be dropped",
    "rotary_interleaved": "LlamaForCausalLM rotates the two halves of each head, not the "
                          "interleaved pairs of --rotary-interleaved",
}


def refuse_non_llama(path: str, description) -> None:
    differences = description.llama_differences()
    if differences:
        reasons = [why for key, why in _NO_LLAMA_COUNTERPART.items()
                   if getattr(description, key)]
        raise ConversionError(
            f"{path} is not a Llama-architecture model ({'; '.join(differences)}): "
            "tools/convert_to_hf.py writes LlamaForCausalLM, which has RMSNorm, SwiGLU, RoPE and "
            "no biases" + "".join(f"; {why}" for why in reasons) + ". Train with "
            "--normalization RMSNorm --swiglu --position-embedding-type rope "
            "--disable-bias-linear (and without --qk-layernorm or --rotary-interleaved) to "
            "export, or keep this model in megatron format")


def export_to_hf(options: ExportOptions) -> list[str]:
    """Write the directory; returns the files written."""
    max_shard_bytes = parse_size(options.max_shard_size)
    check_target(options.output, options.force)  # before the (slow) weight loading
    checkpoint = megatron_checkpoint.open_checkpoint(options.load, options.iteration)
    refuse_patch_stage(checkpoint, options.allow_patch_stage)
    prepared = None
    if options.tokenizer_model is not None:
        prepared = hf_tokenizer.prepare_tokenizer(options.tokenizer_model)
    description = checkpoint.description
    refuse_non_llama(checkpoint.path, description)
    vocab_size = vocab.resolve_vocab_size(description.padded_vocab_size, options.vocab_size,
                                          options.tokenizer_model, checkpoint.args)
    dtype = options.dtype or description.dtype
    weights = megatron_checkpoint.load_full_weights(checkpoint)
    tensors = llama_layout.to_hf(vocab.trim(weights, vocab_size), description)
    tensors = {name: t.to(dtype).contiguous() for name, t in tensors.items()}

    with publish_directory(options.output, options.force) as staging:
        tokens = None
        if prepared is not None:
            tokens = hf_tokenizer.write_tokenizer(prepared, staging,
                                                  model_max_length=description.max_position_embeddings)
        ids = (tokens.bos_id, tokens.eos_id, tokens.pad_id) if tokens else (None, None, None)
        hf_config.write_json(f"{staging}/config.json",
                             hf_config.llama_config(description, vocab_size, dtype, *ids))
        hf_config.write_json(f"{staging}/generation_config.json",
                             hf_config.generation_config(*ids))
        files = write_weights(staging, tensors, max_shard_bytes)
    tokenizer_files = sorted(hf_tokenizer.TOKENIZER_FILES) if prepared is not None else []
    return ["config.json", "generation_config.json", *files, *tokenizer_files]
