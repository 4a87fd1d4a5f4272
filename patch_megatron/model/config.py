"""The model's shape and options as a plain dataclass, and its megatron TransformerConfig."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patch_megatron.model.spec import have_transformer_engine


ACTIVATIONS = ("gelu", "swiglu", "squared_relu")


def activation_function(name: str):
    """The function megatron-core's MLP applies for an activation name (SwiGLU: SiLU, gated)."""
    from megatron.core.activations import squared_relu

    return {"gelu": F.gelu, "swiglu": F.silu, "squared_relu": squared_relu}[name]


def default_ffn_hidden_size(hidden_size: int, activation: str = "gelu") -> int:
    """Megatron-LM's FFN width: 4h, or with SwiGLU's two input projections 2/3 of that,
    rounded down to a multiple of 64."""
    if activation == "swiglu":
        return int((4 * hidden_size * 2 / 3) / 64) * 64
    return 4 * hidden_size


@dataclass
class PatchGPTConfig:
    """A GPT decoder with patch size K (K=1: ordinary next-token training).

    ``seq_length`` is T, the number of model positions: patches when K > 1,
    tokens when K = 1. A sample then carries K*T input tokens.

    The architecture fields default to Megatron-LM's defaults (a GPT-3-style
    decoder: LayerNorm, GeLU, biases, learned absolute positions, dropout 0.1);
    ``patch_megatron.llama_recipe.LLAMA_ARCHITECTURE`` holds the paper's LLaMA
    values. Learned absolute positions, like RoPE's, index the T model positions.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int  # already padded to a multiple of 128*TP by the caller
    seq_length: int
    ffn_hidden_size: int | None = None  # None: Megatron-LM's default (see default_ffn_hidden_size)
    num_query_groups: int | None = None  # None: multi-head attention
    kv_channels: int | None = None  # None: hidden_size // num_attention_heads
    normalization: str = "LayerNorm"  # or "RMSNorm"
    apply_layernorm_1p: bool = False  # the norm's weight holds gamma - 1
    activation: str = "gelu"  # "gelu", "swiglu" (gated SiLU) or "squared_relu"
    add_bias_linear: bool = True
    add_qkv_bias: bool = False  # biases on the QKV projection only (implied by add_bias_linear)
    position_embedding_type: str = "learned_absolute"  # or "rope" or "none"
    rotary_percent: float = 1.0
    # RoPE on interleaved (even, odd) pairs of a head's channels (RoFormer) instead of its two
    # halves (rotate-half, LLaMA's layout).
    rotary_interleaved: bool = False
    # A `normalization` norm (with apply_layernorm_1p's gamma) over each query and key head's
    # kv_channels, before RoPE.
    qk_layernorm: bool = False
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    apply_query_key_layer_scaling: bool = False
    attention_softmax_in_fp32: bool = False
    patch_size: int = 1
    max_position_embeddings: int | None = None
    rotary_base: int = 10000
    init_method_std: float = 0.02
    norm_epsilon: float = 1e-5
    untie_embeddings_and_output_weights: bool = True
    params_dtype: torch.dtype = torch.float32
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    # "transformer_engine" or "local" (megatron-core's layers, torch's fused attention);
    # None: Transformer Engine when it is installed.
    transformer_impl: str | None = None
    # Memory and reproducibility (megatron-core's TransformerConfig fields of the same names);
    # they do not change the parameters.
    recompute_granularity: str | None = None  # "full" or "selective"
    recompute_method: str | None = None  # "uniform" or "block"
    recompute_num_layers: int | None = None
    distribute_saved_activations: bool = False
    deterministic_mode: bool = False

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = default_ffn_hidden_size(self.hidden_size, self.activation)
        if self.add_bias_linear:
            self.add_qkv_bias = True  # as Megatron-LM keeps the two in step
        if self.apply_query_key_layer_scaling:
            self.attention_softmax_in_fp32 = True  # as in Megatron-LM: the scaling needs it
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.transformer_impl is None:
            self.transformer_impl = "transformer_engine" if have_transformer_engine() else "local"
        self.validate()

    def validate(self) -> None:
        """Every shape/parallel combination megatron would reject later, named up front."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        groups = self.num_query_groups or self.num_attention_heads
        checks = [
            (self.patch_size >= 1, f"patch size must be >= 1, got {self.patch_size}"),
            (tp >= 1 and pp >= 1, "tensor and pipeline parallel sizes must be >= 1"),
            (
                self.hidden_size % self.num_attention_heads == 0,
                f"hidden size {self.hidden_size} is not divisible by the "
                f"{self.num_attention_heads} attention heads",
            ),
            (
                self.num_attention_heads % tp == 0,
                f"{self.num_attention_heads} attention heads cannot be split over tensor parallel "
                f"size {tp}; use a tensor parallel size that divides the head count",
            ),
            (
                self.num_attention_heads % groups == 0,
                f"{self.num_attention_heads} attention heads are not divisible into "
                f"{groups} query groups",
            ),
            (
                groups % tp == 0,
                f"{groups} query groups cannot be split over tensor parallel size {tp}",
            ),
            (
                self.ffn_hidden_size % tp == 0,
                f"ffn hidden size {self.ffn_hidden_size} is not divisible by tensor parallel "
                f"size {tp}",
            ),
            (
                self.vocab_size % tp == 0,
                f"vocabulary size {self.vocab_size} is not divisible by tensor parallel size "
                f"{tp}; pad it (--make-vocab-size-divisible-by)",
            ),
            (
                not self.sequence_parallel or tp > 1,
                "sequence parallel needs tensor parallel size > 1; drop --sequence-parallel "
                "or raise --tensor-model-parallel-size",
            ),
            (
                not self.sequence_parallel or self.seq_length % tp == 0,
                f"sequence parallel splits the {self.seq_length} positions over {tp} ranks: "
                "use a sequence length divisible by the tensor parallel size",
            ),
            (
                self.num_layers % pp == 0,
                f"{self.num_layers} layers cannot be split evenly over {pp} pipeline stages",
            ),
            (
                self.max_position_embeddings >= self.seq_length,
                f"max position embeddings {self.max_position_embeddings} is below the sequence "
                f"length {self.seq_length} (positions are patch indices, so T not K*T)",
            ),
            (
                self.normalization in ("LayerNorm", "RMSNorm"),
                f"normalization {self.normalization!r}: use LayerNorm or RMSNorm",
            ),
            (
                self.activation in ACTIVATIONS,
                f"activation {self.activation!r}: use one of {', '.join(ACTIVATIONS)}",
            ),
            (
                self.position_embedding_type in ("learned_absolute", "rope", "none"),
                f"position embedding type {self.position_embedding_type!r}: use "
                "learned_absolute, rope or none",
            ),
            (
                0.0 < self.rotary_percent <= 1.0,
                f"rotary percent must lie in (0, 1], got {self.rotary_percent}",
            ),
            (
                0.0 <= self.hidden_dropout < 1.0 and 0.0 <= self.attention_dropout < 1.0,
                "dropout probabilities must lie in [0, 1)",
            ),
        ]
        if self.transformer_impl == "transformer_engine":
            checks.append((have_transformer_engine(),
                           "--transformer-impl transformer_engine: Transformer Engine is not "
                           "installed; install it (transformer_engine[pytorch]) or use "
                           "--transformer-impl local"))
        checks.append((self.transformer_impl in ("transformer_engine", "local"),
                       f"unknown transformer implementation {self.transformer_impl!r}: "
                       "use 'transformer_engine' or 'local'"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def transformer_config(self, cpu: bool = False):
        """megatron-core's TransformerConfig for this model (fusions that need CUDA kernels off on CPU)."""
        from megatron.core.transformer import TransformerConfig

        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            normalization=self.normalization,
            layernorm_epsilon=self.norm_epsilon,
            layernorm_zero_centered_gamma=self.apply_layernorm_1p,
            gated_linear_unit=self.activation == "swiglu",
            activation_func=activation_function(self.activation),
            add_bias_linear=self.add_bias_linear,
            add_qkv_bias=self.add_qkv_bias,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            apply_query_key_layer_scaling=self.apply_query_key_layer_scaling,
            attention_softmax_in_fp32=self.attention_softmax_in_fp32,
            rotary_interleaved=self.rotary_interleaved,
            qk_layernorm=self.qk_layernorm,
            recompute_granularity=self.recompute_granularity,
            recompute_method=self.recompute_method,
            recompute_num_layers=self.recompute_num_layers,
            distribute_saved_activations=self.distribute_saved_activations,
            deterministic_mode=self.deterministic_mode,
            init_method_std=self.init_method_std,
            params_dtype=self.params_dtype,
            bf16=self.params_dtype == torch.bfloat16,
            fp16=self.params_dtype == torch.float16,
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            sequence_parallel=self.sequence_parallel,
            pipeline_dtype=self.params_dtype,
            use_cpu_initialization=cpu,
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            # Gloo runs point-to-point ops one by one; batching them needs NCCL.
            batch_p2p_comm=not cpu,
            cuda_graph_scope=[],  # megatron's default "full" warns that it is deprecated
        )
