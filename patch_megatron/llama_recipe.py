"""The paper's LLaMA recipe spelled out as Megatron-LM flags.

Megatron-LM's defaults describe a GPT-3-style model (LayerNorm, GeLU, biases,
learned absolute positions, dropout 0.1, Adam beta2 0.999, weight decay 0.01,
linear decay), and a flag left out here means what it means there. The paper
(docs/method.md) trains LLaMA-style models instead, so every command this
project writes for that recipe (the quickstart, the planner, the examples,
the tests) appends these flags, as Megatron-LM's own LLaMA examples do.
"""

ARCHITECTURE_FLAGS = (
    "--normalization", "RMSNorm",
    "--swiglu",
    "--position-embedding-type", "rope",
    "--disable-bias-linear",
    "--attention-dropout", "0.0",
    "--hidden-dropout", "0.0",
)

OPTIMIZER_FLAGS = (
    "--adam-beta1", "0.9",
    "--adam-beta2", "0.95",
    "--adam-eps", "1e-8",
    "--weight-decay", "0.1",
    "--lr-decay-style", "cosine",
    "--clip-grad", "1.0",
)

RECIPE_FLAGS = ARCHITECTURE_FLAGS + OPTIMIZER_FLAGS

# The same architecture as PatchGPTConfig fields (for code that builds a model directly, and
# for checkpoint records written before the architecture was recorded).
LLAMA_ARCHITECTURE = dict(
    normalization="RMSNorm",
    apply_layernorm_1p=False,
    activation="swiglu",
    add_bias_linear=False,
    add_qkv_bias=False,
    position_embedding_type="rope",
    rotary_percent=1.0,
    rotary_interleaved=False,
    qk_layernorm=False,
    hidden_dropout=0.0,
    attention_dropout=0.0,
)
