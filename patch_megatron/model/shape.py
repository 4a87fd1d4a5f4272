"""The model's shape: what fixes its parameters, with Megatron-LM's defaults and its checks.

``ModelShape`` is the one shape type of the project. ``PatchGPTConfig`` extends it with what
a training run adds (sequence length, patch size, dropout, dtype, parallel layout); the
FLOPs model, the EST sampler, the planner, the converters and the checkpoint record read
shapes of this type. The module imports neither torch nor megatron-core, so the flag parser
and the planner can check a shape in milliseconds.

Error messages use Megatron-LM's flag spellings: the field names are the flags' dests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from patch_megatron import llama_recipe

ACTIVATIONS = ("gelu", "swiglu", "squared_relu")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope", "none")


def default_ffn_hidden_size(hidden_size: int, activation: str = "gelu") -> int:
    """Megatron-LM's FFN width: 4h, or with SwiGLU's two input projections 2/3 of that,
    rounded down to a multiple of 64."""
    if activation == "swiglu":
        return int((4 * hidden_size * 2 / 3) / 64) * 64
    return 4 * hidden_size


def padded_vocab_size(vocab_size: int, divisible_by: int = 128, tensor_model_parallel_size: int = 1) -> int:
    """Embedding rows after Megatron's padding: the tokenizer's vocabulary rounded up to a
    multiple of ``--make-vocab-size-divisible-by`` x TP."""
    if vocab_size < 1 or divisible_by < 1 or tensor_model_parallel_size < 1:
        raise ValueError("vocab_size, divisible_by and tensor_model_parallel_size must be positive")
    multiple = divisible_by * tensor_model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """A GPT decoder's shape and architecture (Megatron-LM's defaults: GPT-3 style).

    ``vocab_size`` is the number of embedding rows, i.e. the padded vocabulary; None while it
    is not known yet (a command line checked before its tokenizer is read). The optional
    sizes are resolved on construction: ``ffn_hidden_size`` to Megatron-LM's default,
    ``num_query_groups`` to the head count (multi-head attention), ``kv_channels`` to
    hidden/heads. ``max_position_embeddings`` counts rows of the learned position table.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int | None
    ffn_hidden_size: int | None = None
    num_query_groups: int | None = None
    kv_channels: int | None = None
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
    max_position_embeddings: int | None = None
    untie_embeddings_and_output_weights: bool = True

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads"):
            self._require_positive(name)
        derived = {}
        if self.ffn_hidden_size is None:
            derived["ffn_hidden_size"] = default_ffn_hidden_size(self.hidden_size, self.activation)
        if self.num_query_groups is None:
            derived["num_query_groups"] = self.num_attention_heads
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"--hidden-size {self.hidden_size} is not divisible by "
                                 f"--num-attention-heads {self.num_attention_heads}: give "
                                 "--kv-channels, or a hidden size the head count divides")
            derived["kv_channels"] = self.hidden_size // self.num_attention_heads
        if self.add_bias_linear:
            derived["add_qkv_bias"] = True  # as Megatron-LM keeps the two in step
        for name, value in derived.items():
            object.__setattr__(self, name, value)
        for name in ("ffn_hidden_size", "num_query_groups", "kv_channels"):
            self._require_positive(name)
        if self.vocab_size is not None:
            self._require_positive("vocab_size")
        if self.max_position_embeddings is not None:
            self._require_positive("max_position_embeddings")
        checks = [
            (self.num_attention_heads % self.num_query_groups == 0,
             f"--num-query-groups {self.num_query_groups} must divide --num-attention-heads "
             f"{self.num_attention_heads}"),
            (self.normalization in NORMALIZATIONS,
             f"--normalization {self.normalization!r}: use LayerNorm or RMSNorm"),
            (self.activation in ACTIVATIONS,
             f"activation {self.activation!r}: use one of {', '.join(ACTIVATIONS)}"),
            (self.position_embedding_type in POSITION_EMBEDDING_TYPES,
             f"--position-embedding-type {self.position_embedding_type!r}: use "
             "learned_absolute, rope or none"),
            (0.0 < self.rotary_percent <= 1.0,
             f"--rotary-percent must lie in (0, 1], got {self.rotary_percent}"),
        ]
        _raise_first(checks)

    def _require_positive(self, name: str) -> None:
        value = getattr(self, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{_flag(name)} must be a positive integer, got {value!r}")

    def check_parallel(self, tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                       first_stage_layers: int | None = None,
                       last_stage_layers: int | None = None,
                       virtual_stages: int | None = None, *,
                       embedding_in_split: bool = False, loss_in_split: bool = False) -> None:
        """That megatron-core can split this shape over TP x PP ranks, else why not.

        ``first_stage_layers``/``last_stage_layers`` (--decoder-first/last-pipeline-num-layers)
        fix the end stages' layer counts; the stages between split the rest evenly. With
        ``virtual_stages`` model chunks per pipeline rank (the interleaved schedule) each
        stage's layers split evenly over its chunks. ``embedding_in_split``/``loss_in_split``
        (--account-for-embedding/loss-in-pipeline-split) count the embedding and the loss as
        one layer each in the even split: the first (last) chunk builds one layer fewer.
        """
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise ValueError("--tensor-model-parallel-size and --pipeline-model-parallel-size "
                             "must be >= 1")
        checks = [
            (self.num_attention_heads % tp == 0,
             f"--num-attention-heads {self.num_attention_heads} is not divisible by "
             f"--tensor-model-parallel-size {tp}: use a tensor parallel size that divides the "
             "head count"),
            (self.num_query_groups % tp == 0,
             f"--num-query-groups {self.num_query_groups} is not divisible by "
             f"--tensor-model-parallel-size {tp}"),
            (self.ffn_hidden_size % tp == 0,
             f"--ffn-hidden-size {self.ffn_hidden_size} is not divisible by "
             f"--tensor-model-parallel-size {tp}"),
            (self.vocab_size is None or self.vocab_size % tp == 0,
             f"the vocabulary's {self.vocab_size} rows are not divisible by "
             f"--tensor-model-parallel-size {tp}: pad it (--make-vocab-size-divisible-by)"),
        ]
        _raise_first(checks)
        if embedding_in_split or loss_in_split:
            self._check_counted_split(pp, first_stage_layers, last_stage_layers, virtual_stages,
                                      embedding_in_split, loss_in_split)
            return
        if first_stage_layers is None and last_stage_layers is None:
            _raise_first([(self.num_layers % pp == 0,
                           f"--num-layers {self.num_layers} cannot be split evenly over "
                           f"--pipeline-model-parallel-size {pp}: give a multiple of {pp}, or "
                           "the end stages' counts (--decoder-first-pipeline-num-layers, "
                           "--decoder-last-pipeline-num-layers)")])
            self._check_virtual_stages({"each pipeline stage": self.num_layers // pp},
                                       virtual_stages)
            return
        ends = {"--decoder-first-pipeline-num-layers": first_stage_layers,
                "--decoder-last-pipeline-num-layers": last_stage_layers}
        given = {flag: n for flag, n in ends.items() if n is not None}
        middle_layers = self.num_layers - sum(given.values())
        middle_stages = pp - len(given)
        _raise_first([
            (pp > 1, f"{' and '.join(given)} need --pipeline-model-parallel-size > 1"),
            (all(n >= 1 for n in given.values()),
             f"{' and '.join(given)} must be >= 1 (megatron-core builds no empty end stage)"),
            (middle_layers >= 0 and bool(middle_layers) == bool(middle_stages)
             and (not middle_stages or middle_layers % middle_stages == 0),
             f"--num-layers {self.num_layers} with {', '.join(f'{f} {n}' for f, n in given.items())}"
             f" leaves {middle_layers} of them for the {middle_stages} other pipeline stages: "
             "they must split evenly, with at least one layer each"),
        ])
        stages = {{"--decoder-first-pipeline-num-layers": "the first stage",
                   "--decoder-last-pipeline-num-layers": "the last stage"}[f]: n
                  for f, n in given.items()}
        if middle_stages:
            stages["each other stage"] = middle_layers // middle_stages
        self._check_virtual_stages(stages, virtual_stages)

    def _check_counted_split(self, pp, first_stage_layers, last_stage_layers, virtual_stages,
                             embedding_in_split, loss_in_split) -> None:
        counted = [flag for flag, on in (("--account-for-embedding-in-pipeline-split",
                                          embedding_in_split),
                                         ("--account-for-loss-in-pipeline-split", loss_in_split))
                   if on]
        units = self.num_layers + len(counted)
        _raise_first([
            (first_stage_layers is None and last_stage_layers is None,
             f"{' and '.join(counted)} cannot be combined with --decoder-first/last-pipeline-"
             "num-layers (as in Megatron-LM): give one way of balancing the stages"),
            (units % pp == 0,
             f"--num-layers {self.num_layers} plus the {len(counted)} counted with "
             f"{' and '.join(counted)} makes {units}, which cannot be split evenly over "
             f"--pipeline-model-parallel-size {pp}"),
        ])
        self._check_virtual_stages({"each pipeline stage (counting the embedding or loss)":
                                    units // pp}, virtual_stages)

    @staticmethod
    def _check_virtual_stages(stage_layers: dict[str, int], virtual_stages: int | None) -> None:
        if virtual_stages is None:
            return
        for stage, layers in stage_layers.items():
            _raise_first([(layers % virtual_stages == 0,
                           f"the interleaved schedule splits each pipeline rank's layers into "
                           f"{virtual_stages} model chunks, but {stage} holds {layers}: give "
                           "layer counts divisible by the chunks per rank")])

    @property
    def gated_linear_unit(self) -> bool:
        """SwiGLU: fc1 computes the gate and the up projection."""
        return self.activation == "swiglu"

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def parameter_count(self, include_embeddings: bool = True) -> int:
        """Parameters of the model this shape builds (megatron-core's GPTModel).

        Without embeddings: the transformer layers and the final norm. With them: the word
        embedding, the output layer when untied, and the learned position table.
        """
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.kv_channels
        bias = self.add_bias_linear
        qkv_width = self.num_attention_heads * d + 2 * self.num_query_groups * d
        fc1_width = (2 if self.gated_linear_unit else 1) * f
        per_value = 2 if self.normalization == "LayerNorm" else 1  # LayerNorm has a bias
        norm = h * per_value
        layer = (h * qkv_width + (qkv_width if self.add_qkv_bias else 0)
                 + self.num_attention_heads * d * h + (h if bias else 0)
                 + h * fc1_width + (fc1_width if bias else 0)
                 + f * h + (h if bias else 0)
                 + 2 * norm
                 + (2 * d * per_value if self.qk_layernorm else 0))
        total = self.num_layers * layer + norm
        if include_embeddings:
            if self.vocab_size is None:
                raise ValueError("the vocabulary size is not known yet: cannot count embeddings")
            tables = 2 if self.untie_embeddings_and_output_weights else 1
            total += tables * self.vocab_size * h
            if self.position_embedding_type == "learned_absolute":
                if self.max_position_embeddings is None:
                    raise ValueError("learned absolute positions need --max-position-embeddings "
                                     "to count their table")
                total += self.max_position_embeddings * h
        return total

    def shape_fields(self) -> dict:
        """This shape's own fields (a subclass's extra fields left out)."""
        return {f.name: getattr(self, f.name) for f in fields(ModelShape)}


SHAPE_FIELDS = tuple(f.name for f in fields(ModelShape))


def _raise_first(checks) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


# The paper's LLaMA architecture as shape fields (RMSNorm, SwiGLU, RoPE, no biases).
LLAMA_SHAPE_ARCHITECTURE = {k: v for k, v in llama_recipe.LLAMA_ARCHITECTURE.items()
                            if k in SHAPE_FIELDS}


def llama_shape(**sizes) -> ModelShape:
    """A shape of the given sizes with the paper's LLaMA architecture."""
    return ModelShape(**sizes, **LLAMA_SHAPE_ARCHITECTURE)
