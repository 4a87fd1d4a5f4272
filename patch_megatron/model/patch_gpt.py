"""PatchGPTModel: megatron-core's GPTModel with patch-level training.

With patch size K, a sample of K*T tokens enters as T patch embeddings (the
mean of each patch's K token embeddings, plus the learned position embedding
of the patch when positions are learned), the decoder runs over T positions
0..T-1 (RoPE or learned), and the output at position i is scored against all
K tokens of patch i+1. With K=1 this is megatron-core's GPTModel, its
embedding and its loss, unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from patch_megatron.model.config import PatchGPTConfig
from patch_megatron.model.patch_embedding import PatchEmbedding
from patch_megatron.model.patch_loss import vocab_parallel_patch_cross_entropy
from patch_megatron.model.spec import decoder_block_spec


class PatchGPTModel(GPTModel):
    """GPTModel whose ``labels``/losses are per target token: shape ``[b, K*T]``.

    ``labels[:, i*K + k]`` is token k of patch i+1 (for K=1: the next token).
    The returned loss has the same shape, so megatron's per-token loss
    reduction ``sum(loss * loss_mask) / sum(loss_mask)`` gives the paper's
    mean over positions and the K targets.
    """

    def __init__(self, config, transformer_layer_spec, vocab_size, max_sequence_length,
                 patch_size: int = 1, **kwargs):
        if patch_size < 1:
            raise ValueError(f"patch size must be >= 1, got {patch_size}")
        super().__init__(config, transformer_layer_spec, vocab_size, max_sequence_length, **kwargs)
        self.patch_size = patch_size
        if patch_size > 1 and self.pre_process:
            self.embedding = PatchEmbedding(
                config=self.config,
                vocab_size=vocab_size,
                max_sequence_length=max_sequence_length,
                patch_size=patch_size,
                position_embedding_type=self.position_embedding_type,
                tp_group=self.pg_collection.tp,
            )

    def forward(self, input_ids, position_ids=None, attention_mask=None, labels=None, **kwargs):
        if labels is not None and input_ids is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"labels {tuple(labels.shape)} must have the shape of input_ids "
                f"{tuple(input_ids.shape)}: one target per input token, K per patch"
            )
        if self.position_embedding_type == "learned_absolute" and self.pre_process:
            # Learned positions index the T model positions (patches), whatever the caller
            # passes; RoPE takes its positions from the decoder input's length.
            batch, num_tokens = input_ids.shape
            position_ids = torch.arange(num_tokens // self.patch_size, device=input_ids.device)
            position_ids = position_ids.unsqueeze(0).expand(batch, -1)
        return super().forward(input_ids, position_ids, attention_mask, labels=labels, **kwargs)

    def compute_language_model_loss(self, labels, logits):
        if self.patch_size == 1:
            return super().compute_language_model_loss(labels, logits)
        batch, num_targets = labels.shape
        targets = labels.view(batch, num_targets // self.patch_size, self.patch_size)
        targets = targets.transpose(0, 1).contiguous()  # [T, b, K], like logits [T, b, V/tp]
        loss = vocab_parallel_patch_cross_entropy(logits, targets, self.pg_collection.tp)
        return loss.transpose(0, 1).reshape(batch, num_targets)


def build_model(config: PatchGPTConfig, pre_process: bool | None = None,
                post_process: bool | None = None, cpu: bool | None = None,
                layer_spec=None, vp_stage: int | None = None) -> PatchGPTModel:
    """The model chunk of this pipeline rank (needs megatron's parallel state initialised):
    with the interleaved schedule, its chunk ``vp_stage`` of
    ``config.virtual_pipeline_model_parallel_size``.

    ``layer_spec(transformer_config)`` gives the decoder's layer specs; by default
    ``spec.decoder_block_spec``'s. EST passes ``patch_megatron.est.spec.subnetwork_block_spec``,
    whose layers run the plain model until a step's subnetwork is set (the same parameters).
    """
    from megatron.core import parallel_state

    from patch_megatron import cpu_mode

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    if cpu is None:
        cpu = cpu_mode.is_installed()
    transformer_config = config.transformer_config(cpu=cpu)
    if layer_spec is None:
        block_spec = decoder_block_spec(
            transformer_config, use_transformer_engine=config.transformer_impl == "transformer_engine",
            vp_stage=vp_stage)
    else:
        block_spec = layer_spec(transformer_config)
    model = PatchGPTModel(
        config=transformer_config,
        transformer_layer_spec=block_spec,
        vocab_size=config.vocab_size,
        max_sequence_length=config.max_position_embeddings,
        patch_size=config.patch_size,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not config.untie_embeddings_and_output_weights,
        position_embedding_type=config.position_embedding_type,
        rotary_percent=config.rotary_percent,
        rotary_base=config.rotary_base,
        vp_stage=vp_stage,
    )
    if not cpu:
        model.cuda(torch.cuda.current_device())
    return model
