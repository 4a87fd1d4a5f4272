"""A local Hugging Face Llama directory -> a weights-only checkpoint of ours at a chosen TP/PP."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patch_megatron.conversion import hf_config, llama_layout, megatron_checkpoint, vocab
from patch_megatron.conversion.errors import ConversionError
from patch_megatron.conversion.output_dir import check_target, publish_directory
from patch_megatron.conversion.safetensors_io import read_weights
from patch_megatron.llama_recipe import ARCHITECTURE_FLAGS
from patch_megatron.model.shape import padded_vocab_size


@dataclass
class ImportOptions:
    hf_dir: str
    save: str
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    make_vocab_size_divisible_by: int = 128
    dtype: torch.dtype | None = None  # None: the config's torch_dtype
    force: bool = False


def _check_layout(description, tp: int, pp: int) -> None:
    # Raises ValueError naming the constraint (heads, groups, ffn, layers vs TP/PP).
    from dataclasses import replace

    config = description.model_config()
    try:
        replace(config, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp).validate()
    except ValueError as error:
        raise ConversionError(f"cannot lay the model out at TP={tp}, PP={pp}: {error}") from None


def training_flags(description, options: ImportOptions) -> list[str]:
    """pretrain_patch_gpt.py flags that build this model (the user adds data, batch, length)."""
    flags = [
        f"--num-layers {description.num_layers}", f"--hidden-size {description.hidden_size}",
        f"--ffn-hidden-size {description.ffn_hidden_size}",
        f"--num-attention-heads {description.num_attention_heads}",
        f"--max-position-embeddings {description.max_position_embeddings}",
        f"--rotary-base {int(description.rotary_base)}", f"--norm-epsilon {description.norm_epsilon}",
        f"--make-vocab-size-divisible-by {options.make_vocab_size_divisible_by}",
        f"--tensor-model-parallel-size {options.tensor_parallel_size}",
        f"--pipeline-model-parallel-size {options.pipeline_parallel_size}",
    ]
    if description.kv_channels * description.num_attention_heads != description.hidden_size:
        flags.append(f"--kv-channels {description.kv_channels}")
    flags.append(" ".join(ARCHITECTURE_FLAGS))  # a Llama is the paper's LLaMA architecture
    if description.num_query_groups != description.num_attention_heads:
        flags.append(f"--group-query-attention --num-query-groups {description.num_query_groups}")
    if description.untie_embeddings_and_output_weights:
        flags.append("--untie-embeddings-and-output-weights")
    if description.dtype == torch.bfloat16:
        flags.append("--bf16")
    elif description.dtype == torch.float16:
        flags.append("--fp16")
    return flags


def import_from_hf(options: ImportOptions) -> tuple[str, list[str]]:
    """Write the checkpoint; returns its iteration directory and the matching training flags."""
    check_target(options.save, options.force)
    config = hf_config.read_llama_config(options.hf_dir)
    description = hf_config.description_from_llama_config(config, options.hf_dir)
    if options.dtype is not None:
        from dataclasses import replace

        description = replace(description, dtype=options.dtype)
    tp, pp = options.tensor_parallel_size, options.pipeline_parallel_size
    true_vocab = description.padded_vocab_size
    padded = padded_vocab_size(true_vocab, options.make_vocab_size_divisible_by, tp)
    description = description.with_vocab(padded, true_vocab)
    _check_layout(description, tp, pp)

    weights = llama_layout.from_hf(read_weights(options.hf_dir), description)
    weights = vocab.repad(weights, true_vocab, padded)
    weights = megatron_checkpoint.cast(weights, description.dtype)
    flags = training_flags(description, options)
    args = {
        "num_layers": description.num_layers, "hidden_size": description.hidden_size,
        "ffn_hidden_size": description.ffn_hidden_size,
        "num_attention_heads": description.num_attention_heads,
        "group_query_attention": description.num_query_groups != description.num_attention_heads,
        "num_query_groups": description.num_query_groups,
        "max_position_embeddings": description.max_position_embeddings,
        "seq_length": description.max_position_embeddings,
        "rotary_base": description.rotary_base, "norm_epsilon": description.norm_epsilon,
        "untie_embeddings_and_output_weights": description.untie_embeddings_and_output_weights,
        "make_vocab_size_divisible_by": options.make_vocab_size_divisible_by,
        "vocab_size": true_vocab, "patch_size": 1,
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
        "bf16": description.dtype == torch.bfloat16, "fp16": description.dtype == torch.float16,
        "normalization": "RMSNorm", "swiglu": True, "add_bias_linear": False,
        "position_embedding_type": "rope", "kv_channels": description.kv_channels,
    }
    record = megatron_checkpoint.weights_only_record(
        description, args, tp, pp,
        converted_from={"tool": "tools/convert_from_hf.py", "format": "huggingface-llama",
                        "vocab_size": true_vocab},
    )
    with publish_directory(options.save, options.force) as staging:
        megatron_checkpoint.save_weights_only(staging, weights, description, record)
    return megatron_checkpoint.checkpoint_directory(options.save)[0], flags
