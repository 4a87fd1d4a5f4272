#!/usr/bin/env bash
# The paper's 370M LLaMA, patch-level: a patch stage (K tokens per patch) on the first λ of
# the tokens, the weights-only handoff, then a token stage on the rest (examples/README.md).
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0> bash examples/pretrain_llama_370m.sh
#   DRY_RUN=1 bash examples/pretrain_llama_370m.sh    # print the commands, run nothing
# Every setting below can be overridden from the environment.

# Model shape (docs/method.md §1): hidden, ffn, layers, heads
NUM_LAYERS=24
HIDDEN_SIZE=1024
FFN_HIDDEN_SIZE=2752
NUM_ATTENTION_HEADS=16

# Data (megatron indexed files from tools/preprocess_data.py), tokenizer, checkpoints
DATA_PATH=${DATA_PATH:-data/pile_text_document}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-tokenizer.model}  # SentencePiece, 32000 pieces
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/llama_370m}  # on a filesystem all nodes share

# Nodes (Megatron-LM's variables)
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}

# Parallelism and memory
TP=${TP:-1}
PP=${PP:-1}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-8}

# Token budget of both stages, patch size K and the patch stage's share λ (the paper: 360B, 4, 2/3)
TRAIN_TOKENS=${TRAIN_TOKENS:-360000000000}
PATCH_SIZE=${PATCH_SIZE:-4}
PATCH_DATA_FRACTION=${PATCH_DATA_FRACTION:-0.6666666666666666}

source "$(dirname "${BASH_SOURCE[0]}")/llama_two_stage.sh"
