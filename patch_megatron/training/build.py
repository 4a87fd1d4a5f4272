"""megatron-core's training parts, configured from the flags: model + DDP, optimizer, schedule."""

from __future__ import annotations

import torch

from patch_megatron.model.config import PatchGPTConfig
from patch_megatron.model.patch_gpt import build_model
from patch_megatron.training import rerun
from patch_megatron.training.arguments import model_shape


def model_config(args, vocab_size: int) -> PatchGPTConfig:
    """The model the flags describe, for the tokenizer's (unpadded) ``vocab_size``."""
    return PatchGPTConfig(
        **model_shape(args, vocab_size).shape_fields(),
        seq_length=args.seq_length,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        apply_query_key_layer_scaling=args.apply_query_key_layer_scaling,
        attention_softmax_in_fp32=args.attention_softmax_in_fp32,
        patch_size=args.patch_size,
        rotary_base=args.rotary_base,
        init_method_std=args.init_method_std,
        norm_epsilon=args.norm_epsilon,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=args.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=args.decoder_last_pipeline_num_layers,
        account_for_embedding_in_pipeline_split=args.account_for_embedding_in_pipeline_split,
        account_for_loss_in_pipeline_split=args.account_for_loss_in_pipeline_split,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        microbatch_group_size_per_vp_stage=args.microbatch_group_size_per_vp_stage,
        # As in Megatron-LM, transfers overlap compute only in the interleaved schedule.
        overlap_p2p_comm=args.overlap_p2p_comm and args.virtual_pipeline_model_parallel_size is not None,
        overlap_p2p_comm_warmup_flush=args.overlap_p2p_comm_warmup_flush,
        sequence_parallel=args.sequence_parallel,
        transformer_impl=args.transformer_impl,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        distribute_saved_activations=args.distribute_saved_activations,
        deterministic_mode=args.deterministic_mode,
    )


def grad_reduce_in_fp32(args) -> bool:
    """Megatron-LM's rule: fp32 gradient buffers when asked, and by default under bf16
    (whose main gradients are fp32) unless --grad-reduce-in-bf16."""
    if args.grad_reduce_in_bf16:
        return False
    return args.accumulate_allreduce_grads_in_fp32 or args.bf16


def build_ddp_model(args, config: PatchGPTConfig) -> list:
    """This pipeline rank's model chunks, each in megatron's DDP (gradient buffers, DP
    all-reduce): one chunk, or one per virtual stage with the interleaved schedule. A list
    either way, as megatron-core's schedules, optimizer and Megatron-LM take it."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    layer_spec = None
    if args.est:
        from patch_megatron.est.spec import subnetwork_block_spec as layer_spec
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32(args),
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
        average_in_collective=False,
        **rerun.grad_checks(args),  # the rerun machine validates each gradient bucket
    )
    chunks = []
    interleaved = config.virtual_pipeline_model_parallel_size is not None
    for vp_stage in range(config.virtual_pipeline_model_parallel_size or 1):
        model = build_model(config, layer_spec=layer_spec,
                            vp_stage=vp_stage if interleaved else None)
        # The loss is reduced per token over the whole global batch (sum of token losses /
        # token count), whatever the micro-batching and data-parallel layout:
        # finalize_model_grads divides.
        model.config.calculate_per_token_loss = True
        # As in Megatron-LM: the chunks after the first reduce without bucketing; their
        # reductions overlap compute anyway.
        chunks.append(DistributedDataParallel(config=model.config, ddp_config=ddp_config,
                                              module=model, disable_bucketing=vp_stage > 0))
    return chunks


def build_optimizer(args, model: list):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",  # megatron's "adam" is AdamW: decoupled weight decay
        lr=args.lr,
        min_lr=args.min_lr,
        # megatron-core gives the embedding and output layer these (is_embedding_or_output_parameter)
        decoupled_lr=args.decoupled_lr,
        decoupled_min_lr=args.decoupled_min_lr,
        log_num_zeros_in_grad=args.log_num_zeros_in_grad,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        fp16=args.fp16,
        loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale,
        loss_scale_window=args.loss_scale_window,
        hysteresis=args.hysteresis,
        params_dtype=model[0].config.params_dtype,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, model)


def build_scheduler(args, plan, optimizer):
    """This stage's own warmup + decay, counted in samples as Megatron-LM's scheduler counts."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=plan.lr_warmup_samples,
        lr_decay_steps=max(plan.lr_decay_samples, 1),
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay if args.start_weight_decay is None else args.start_weight_decay,
        end_wd=args.weight_decay if args.end_weight_decay is None else args.end_weight_decay,
        wd_incr_steps=max(plan.train_samples, 1),
        wd_incr_style=args.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        wsd_decay_steps=plan.lr_wsd_decay_samples,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )


def wire_schedule_hooks(model: list, optimizer) -> None:
    """What megatron's schedules call back into: grad finalisation, no_sync, loss scaling
    (the schedules read the first chunk's config; one hook per chunk, as Megatron-LM wires
    them)."""
    from megatron.core.distributed import finalize_model_grads

    config = model[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [chunk.no_sync for chunk in model]
    if len(model) == 1:
        config.no_sync_func = config.no_sync_func[0]
    if model[0].ddp_config.overlap_grad_reduce:
        # The pipeline schedules start the last micro-batch's bucket reductions through this.
        config.grad_sync_func = [chunk.start_grad_sync for chunk in model]
        if len(model) == 1:
            config.grad_sync_func = config.grad_sync_func[0]
    config.grad_scale_func = optimizer.scale_loss
