# Shared body of examples/pretrain_llama_*.sh (sourced by them after they set the variables):
# the paper's LLaMA recipe as a patch stage, the weights-only handoff and a token stage.
# Run one of those scripts on every node with its NODE_RANK; DRY_RUN=1 prints the commands.
set -euo pipefail

: "${NUM_LAYERS:?source this file from one of examples/pretrain_llama_*.sh}"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}

# The paper keeps T = 2048 positions and 2M tokens per optimizer step in both stages:
# the token stage runs 1024 samples of 2048 tokens, the patch stage 1024/K samples of K*2048.
SEQ_LENGTH=2048
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-1024}
if (( GLOBAL_BATCH_SIZE % PATCH_SIZE )); then
    echo "error: GLOBAL_BATCH_SIZE=$GLOBAL_BATCH_SIZE is not divisible by PATCH_SIZE=$PATCH_SIZE;" \
         "the patch stage runs GLOBAL_BATCH_SIZE/K samples to keep tokens per step equal:" \
         "use a multiple of $PATCH_SIZE" >&2
    exit 2
fi
PATCH_GLOBAL_BATCH_SIZE=$((GLOBAL_BATCH_SIZE / PATCH_SIZE))

PATCH_DIR=$CHECKPOINT_DIR/patch          # the patch stage's checkpoints
HANDOFF_DIR=$CHECKPOINT_DIR/token_init   # the converter's weights-only checkpoint
TOKEN_DIR=$CHECKPOINT_DIR/token          # the token stage's checkpoints

# Flags of both stages. --train-tokens is the whole run's budget: each stage derives its own
# iterations from its λ share, so no step count is computed here.
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
    # data: SentencePiece tokenizer (32000 pieces); the λ split of the budget between the stages
    --data-path "$DATA_PATH" --split 969,30,1
    --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
    --train-tokens "$TRAIN_TOKENS" --patch-data-fraction "$PATCH_DATA_FRACTION"
    # logging and checkpoints; SIGTERM (preemption) saves and exits
    --log-interval 10 --eval-interval 1000 --eval-iters 10 --save-interval 1000
    --exit-signal-handler
)
if (( TP > 1 )); then
    PRETRAIN_ARGS+=(--sequence-parallel)
fi

LAUNCH=(torchrun --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
        --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")

# DRY_RUN=1 prints each command (quoted, ready to paste into a shell) instead of running it.
run() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        printf '%q ' "$@"
        echo
    else
        "$@"
    fi
}

latest_iteration() {  # the iteration of a directory's last completed save, or nothing
    cat "$1/latest_checkpointed_iteration.txt" 2>/dev/null || true
}

# ---- 1. Patch stage: K tokens per patch on the first λ of the data; resumes from PATCH_DIR.
PATCH_STAGE_ARGS=("${PRETRAIN_ARGS[@]}" --patch-size "$PATCH_SIZE"
                  --global-batch-size "$PATCH_GLOBAL_BATCH_SIZE"
                  --load "$PATCH_DIR" --save "$PATCH_DIR"
                  --tensorboard-dir "$CHECKPOINT_DIR/tensorboard/patch")
# Its planned iterations, from pretrain_patch_gpt.py's own parser: the converter hands over
# exactly that checkpoint, never the last save of an interrupted stage.
PATCH_ITERS=$(cd "$REPO" && PYTHONWARNINGS=ignore "$PYTHON" - "${PATCH_STAGE_ARGS[@]}" <<'PY'
import sys
from patch_megatron.training.arguments import ArgumentError, parse_args
try:
    print(parse_args(sys.argv[1:]).stage.train_iters)
except ArgumentError as error:
    sys.exit(f"error in the patch stage's flags: {error}")
PY
)
echo "# 1/3 patch stage: K=$PATCH_SIZE, $PATCH_ITERS iterations of $PATCH_GLOBAL_BATCH_SIZE x" \
     "$((PATCH_SIZE * SEQ_LENGTH)) tokens, into $PATCH_DIR"
if [[ "$(latest_iteration "$PATCH_DIR")" == "$PATCH_ITERS" ]]; then
    echo "# done before: skipped"
else
    run "${LAUNCH[@]}" "$REPO/pretrain_patch_gpt.py" "${PATCH_STAGE_ARGS[@]}"
fi

# ---- 2. Handoff: the patch stage's weights only, patch size 1. Node rank 0 converts, the other
# nodes wait for its output, so CHECKPOINT_DIR must be on a filesystem all nodes share.
echo "# 2/3 handoff: iteration $PATCH_ITERS of the patch stage, weights only, into $HANDOFF_DIR"
if [[ -n "$(latest_iteration "$HANDOFF_DIR")" ]]; then
    echo "# done before: reused"
elif [[ "$NODE_RANK" == 0 ]]; then
    run "$PYTHON" "$REPO/tools/convert_patch_to_token.py" \
        --load "$PATCH_DIR" --iteration "$PATCH_ITERS" --save "$HANDOFF_DIR"
else
    echo "# node rank $NODE_RANK: waiting for node rank 0 to write $HANDOFF_DIR"
    if [[ "${DRY_RUN:-0}" != 1 ]]; then
        until [[ -n "$(latest_iteration "$HANDOFF_DIR")" ]]; do sleep 10; done
    fi
fi

# ---- 3. Token stage: the rest of the data, a fresh optimizer and schedule from the handoff's
# weights; once it has saved, it resumes from TOKEN_DIR instead.
echo "# 3/3 token stage: $GLOBAL_BATCH_SIZE x $SEQ_LENGTH tokens per step, into $TOKEN_DIR"
TOKEN_LOAD=$HANDOFF_DIR
if [[ -n "$(latest_iteration "$TOKEN_DIR")" ]]; then
    TOKEN_LOAD=$TOKEN_DIR
fi
run "${LAUNCH[@]}" "$REPO/pretrain_patch_gpt.py" "${PRETRAIN_ARGS[@]}" --patch-size 1 \
    --global-batch-size "$GLOBAL_BATCH_SIZE" --load "$TOKEN_LOAD" --save "$TOKEN_DIR" \
    --tensorboard-dir "$CHECKPOINT_DIR/tensorboard/token"
