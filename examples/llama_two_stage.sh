# Shared body of examples/pretrain_llama_*.sh (sourced by them after they set the variables):
# the paper's LLaMA recipe as one tools/pretrain_two_stage.py command, which plans and runs the
# patch stage, the weights-only handoff and the token stage (and continues them when re-run).
# Run one of those scripts on every node with its NODE_RANK; DRY_RUN=1 prints the plan and the
# commands instead.
set -euo pipefail

: "${NUM_LAYERS:?source this file from one of examples/pretrain_llama_*.sh}"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}

# The paper keeps T = 2048 positions and 2M tokens per optimizer step in both stages:
# the token stage runs 1024 samples of 2048 tokens, the patch stage 1024/K samples of K*2048.
SEQ_LENGTH=2048
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-1024}

RUN=(
    # The run: the whole budget, K and λ, the token stage's batch; DIR/patch, DIR/token_init
    # and DIR/token are written under --save (a filesystem all nodes share: node rank 0
    # converts, the others wait for it)
    --train-tokens "$TRAIN_TOKENS" --patch-size "$PATCH_SIZE"
    --patch-data-fraction "$PATCH_DATA_FRACTION" --global-batch-size "$GLOBAL_BATCH_SIZE"
    --save "$CHECKPOINT_DIR"
    # Nodes (each stage starts through torch.distributed.run)
    --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
)
PRETRAIN_ARGS=(
    # LLaMA: RMSNorm, SwiGLU, RoPE, untied embeddings, init std 0.02, no biases, no dropout
    --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN_SIZE" --ffn-hidden-size "$FFN_HIDDEN_SIZE"
    --num-attention-heads "$NUM_ATTENTION_HEADS"
    --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH"
    --normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear
    --untie-embeddings-and-output-weights --init-method-std 0.02
    --attention-dropout 0 --hidden-dropout 0
    # AdamW (0.9, 0.95), eps 1e-8, weight decay 0.1, clip 1.0; lr 3e-4, 2000 warmup steps and a
    # cosine to 0 in each stage; bf16
    --optimizer adam --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --weight-decay 0.1
    --clip-grad 1.0 --lr 3e-4 --min-lr 0 --lr-decay-style cosine --lr-warmup-iters 2000 --bf16
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --use-distributed-optimizer --overlap-grad-reduce --micro-batch-size "$MICRO_BATCH_SIZE"
    # data: SentencePiece tokenizer (32000 pieces)
    --data-path "$DATA_PATH" --split 969,30,1
    --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
    # logging (one TensorBoard folder per stage under it) and checkpoints; SIGTERM (preemption)
    # saves and exits, and the same command continues
    --log-interval 10 --eval-interval 1000 --eval-iters 10 --save-interval 1000
    --tensorboard-dir "$CHECKPOINT_DIR/tensorboard" --exit-signal-handler
)
if (( TP > 1 )); then
    PRETRAIN_ARGS+=(--sequence-parallel)
fi
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    RUN+=(--dry-run)
fi

cd "$REPO"
exec "$PYTHON" tools/pretrain_two_stage.py "${RUN[@]}" "${PRETRAIN_ARGS[@]}"
