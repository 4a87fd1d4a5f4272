"""Patch stage -> token stage: the patch stage's weights, nothing else, plus where its data ended.

The token stage starts from the patch stage's weights only (docs/method.md §1: the
optimizer state, LR schedule and iteration counter are reset). The result is
a weights-only checkpoint at iteration 0 with patch size 1, which
pretrain_patch_gpt.py ``--load``s as a fresh start. It records the patch
stage's data position (``data_position``) so the token stage can check that
its own data begins past what the patch stage read: the λ split gives the
token stage the stream after the patch stage's share.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from patch_megatron.conversion import megatron_checkpoint, vocab
from patch_megatron.conversion.errors import ConversionError
from patch_megatron.conversion.output_dir import check_target, publish_directory
from patch_megatron.model.shape import padded_vocab_size
from patch_megatron.stage import Stage


@dataclass
class HandoffOptions:
    load: str
    save: str
    iteration: int | None = None
    target_tensor_parallel_size: int | None = None  # None: the patch stage's
    target_pipeline_parallel_size: int | None = None
    vocab_size: int | None = None  # needed only when re-padding and the run's flags cannot tell
    force: bool = False


def data_position(record) -> dict:
    """Where the patch stage's reading of the training stream stopped."""
    if record.seq_length is None:
        raise ConversionError("the checkpoint records no sequence length, so its data position is "
                              "unknown: it is incomplete or was not written by pretrain_patch_gpt.py")
    K, T = record.patch_size, record.seq_length
    samples = record.consumed_train_samples
    flags = record.flags
    return {
        "stage": Stage.PATCH.value,
        "patch_size": K,
        "seq_length": T,
        "tokens_per_sample": K * T,
        "iteration": record.iteration,
        "consumed_samples": samples,
        "consumed_tokens": samples * K * T,
        "patch_data_fraction": flags.get("patch_data_fraction"),
        "train_tokens": flags.get("train_tokens"),
        "global_batch_size": record.global_batch_size,
        "seed": flags.get("seed"),
        "data_path": flags.get("data_path"),
        "split": flags.get("split"),
        "mock_data": flags.get("mock_data"),
    }


def refuse_token_level(checkpoint, force: bool) -> None:
    if checkpoint.description.patch_size == 1 and not force:
        converted = " (already converted)" if checkpoint.record.weights_only else ""
        raise ConversionError(
            f"{checkpoint.path} is already token-level (patch size 1){converted}: there is no "
            "patch stage to hand over. Load it directly with pretrain_patch_gpt.py --load, or pass "
            "--force to rewrite it as a weights-only iteration-0 checkpoint anyway")


def convert_patch_to_token(options: HandoffOptions) -> tuple[str, dict]:
    """Write the token stage's initial checkpoint; returns its directory and the data position."""
    check_target(options.save, options.force)
    checkpoint = megatron_checkpoint.open_checkpoint(options.load, options.iteration)
    refuse_token_level(checkpoint, options.force)
    record = checkpoint.record
    position = record.data_position if record.weights_only else data_position(record)
    args = dict(checkpoint.args)
    source_tp, source_pp = record.layout
    tp = options.target_tensor_parallel_size or source_tp
    pp = options.target_pipeline_parallel_size or source_pp

    description = checkpoint.description
    source_padded = description.padded_vocab_size
    divisible_by = record.make_vocab_size_divisible_by
    weights = megatron_checkpoint.load_full_weights(checkpoint)
    if tp != source_tp:
        # Megatron pads the vocabulary to a multiple of divisible_by x TP: at another TP the
        # token stage expects another row count, so the rows are re-padded for it.
        true_vocab = vocab.resolve_vocab_size(source_padded, options.vocab_size, None, args)
        padded = padded_vocab_size(true_vocab, divisible_by, tp)
        if padded != source_padded:
            weights = vocab.repad(weights, true_vocab, padded)
            description = description.with_vocab(padded, true_vocab)
    try:
        # The stage split as the patch stage's flags gave it (the token stage takes the same).
        replace(description.model_config(patch_size=1), tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                num_layers_in_first_pipeline_stage=args.get("decoder_first_pipeline_num_layers"),
                num_layers_in_last_pipeline_stage=args.get("decoder_last_pipeline_num_layers"),
                account_for_embedding_in_pipeline_split=bool(
                    args.get("account_for_embedding_in_pipeline_split")),
                account_for_loss_in_pipeline_split=bool(
                    args.get("account_for_loss_in_pipeline_split"))).validate()
    except ValueError as error:
        raise ConversionError(f"the model cannot be laid out at TP={tp}, PP={pp}: {error}") from None

    args.update(load=None, save=None, finetune=False)
    new_record = megatron_checkpoint.weights_only_record(
        description, args, tp, pp,
        data_position=position,
        converted_from={"tool": "tools/convert_patch_to_token.py", "path": checkpoint.path,
                        "iteration": checkpoint.iteration,
                        "patch_size": checkpoint.description.patch_size},
    )
    with publish_directory(options.save, options.force) as staging:
        megatron_checkpoint.save_weights_only(staging, weights, description, new_record)
    return megatron_checkpoint.checkpoint_directory(options.save)[0], position
