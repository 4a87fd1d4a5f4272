"""The model's config (its shape plus a run's options) and its megatron TransformerConfig."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patch_megatron.model.shape import ModelShape
from patch_megatron.model.spec import have_transformer_engine


def activation_function(name: str):
    """The function megatron-core's MLP applies for an activation name (SwiGLU: SiLU, gated)."""
    from megatron.core.activations import squared_relu

    return {"gelu": F.gelu, "swiglu": F.silu, "squared_relu": squared_relu}[name]


@dataclass(frozen=True, kw_only=True)
class PatchGPTConfig(ModelShape):
    """A GPT decoder with patch size K (K=1: ordinary next-token training).

    The shape and architecture fields are ``ModelShape``'s, with Megatron-LM's defaults (a
    GPT-3-style decoder: LayerNorm, GeLU, biases, learned absolute positions);
    ``patch_megatron.llama_recipe.LLAMA_ARCHITECTURE`` holds the paper's LLaMA values.
    ``vocab_size`` is already padded (``shape.padded_vocab_size``).

    ``seq_length`` is T, the number of model positions: patches when K > 1, tokens when
    K = 1. A sample then carries K*T input tokens. Learned absolute positions, like RoPE's,
    index the T model positions.
    """

    seq_length: int
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    apply_query_key_layer_scaling: bool = False
    attention_softmax_in_fp32: bool = False
    patch_size: int = 1
    rotary_base: int = 10000
    init_method_std: float = 0.02
    norm_epsilon: float = 1e-5
    params_dtype: torch.dtype = torch.float32
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Uneven pipelines: the first and last stages' layer counts (None: an even share).
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None
    # Or an even split that counts the embedding (the loss) as a layer of the first (last) stage.
    account_for_embedding_in_pipeline_split: bool = False
    account_for_loss_in_pipeline_split: bool = False
    # The interleaved schedule: model chunks per pipeline rank (None: one), the micro-batches
    # each chunk runs in a row (None: PP), and whether stage-to-stage transfers overlap compute.
    virtual_pipeline_model_parallel_size: int | None = None
    microbatch_group_size_per_vp_stage: int | None = None
    overlap_p2p_comm: bool = False
    overlap_p2p_comm_warmup_flush: bool = False
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
        if self.max_position_embeddings is None:
            object.__setattr__(self, "max_position_embeddings", self.seq_length)
        super().__post_init__()
        if self.vocab_size is None:
            raise ValueError("PatchGPTConfig needs the padded vocabulary size (vocab_size)")
        if self.apply_query_key_layer_scaling:
            # as in Megatron-LM: the scaling needs it
            object.__setattr__(self, "attention_softmax_in_fp32", True)
        if self.transformer_impl is None:
            impl = "transformer_engine" if have_transformer_engine() else "local"
            object.__setattr__(self, "transformer_impl", impl)
        self.validate()

    @property
    def shape(self) -> ModelShape:
        return ModelShape(**self.shape_fields())

    def validate(self) -> None:
        """What megatron would reject later about this run's layout, named up front."""
        tp = self.tensor_model_parallel_size
        self.check_parallel(tp, self.pipeline_model_parallel_size,
                            self.num_layers_in_first_pipeline_stage,
                            self.num_layers_in_last_pipeline_stage,
                            self.virtual_pipeline_model_parallel_size,
                            embedding_in_split=self.account_for_embedding_in_pipeline_split,
                            loss_in_split=self.account_for_loss_in_pipeline_split)
        checks = [
            (self.patch_size >= 1, f"--patch-size must be >= 1, got {self.patch_size}"),
            (not self.sequence_parallel or tp > 1,
             "sequence parallel needs tensor parallel size > 1; drop --sequence-parallel "
             "or raise --tensor-model-parallel-size"),
            (not self.sequence_parallel or self.seq_length % tp == 0,
             f"--sequence-parallel splits the {self.seq_length} positions over {tp} ranks: use "
             "a --seq-length divisible by --tensor-model-parallel-size"),
            (self.max_position_embeddings >= self.seq_length,
             f"--max-position-embeddings {self.max_position_embeddings} is below --seq-length "
             f"{self.seq_length} (positions are patch indices, so T not K*T)"),
            (0.0 <= self.hidden_dropout < 1.0 and 0.0 <= self.attention_dropout < 1.0,
             "--attention-dropout and --hidden-dropout must lie in [0, 1)"),
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
            num_layers_in_first_pipeline_stage=self.num_layers_in_first_pipeline_stage,
            num_layers_in_last_pipeline_stage=self.num_layers_in_last_pipeline_stage,
            account_for_embedding_in_pipeline_split=self.account_for_embedding_in_pipeline_split,
            account_for_loss_in_pipeline_split=self.account_for_loss_in_pipeline_split,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_model_parallel_size,
            microbatch_group_size_per_vp_stage=self.microbatch_group_size_per_vp_stage,
            overlap_p2p_comm=self.overlap_p2p_comm,
            overlap_p2p_comm_warmup_flush=self.overlap_p2p_comm_warmup_flush,
            sequence_parallel=self.sequence_parallel,
            pipeline_dtype=self.params_dtype,
            use_cpu_initialization=cpu,
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            # Gloo runs point-to-point ops one by one; batching them needs NCCL. Overlapped
            # transfers are single asynchronous ones (megatron-core refuses both at once).
            batch_p2p_comm=not cpu and not self.overlap_p2p_comm,
            cuda_graph_scope=[],  # megatron's default "full" warns that it is deprecated
        )
