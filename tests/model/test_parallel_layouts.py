"""TP=2, PP=2 (even; uneven: 1 + 3 of 4 layers; interleaved: 2 chunks of 1 layer per rank;
interleaved with the embedding and the loss counted as layers: 3 chunks per rank, the first
and the last empty), DP=2 and TP=2 with sequence parallelism against TP=1/PP=1/DP=1.

Each layout runs on two real gloo processes through megatron-core's own
pipeline schedule, DDP and finalize_model_grads, for K=1 and K=4 and for both
architectures (the paper's LLaMA and Megatron-LM's default GPT: LayerNorm
biases, learned positions, linear biases, GeLU), on the same full weights and
data as the single-process model; loss and every gathered gradient must match.
"""

import pytest
import torch

from distributed_harness import run_on_ranks
from megatron_layout import shifted_name, tp_concat, tp_slice
from patch_megatron.llama_recipe import LLAMA_ARCHITECTURE

SHAPE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=48, vocab_size=64, seq_length=6)
# The uneven and interleaved pipelines' model: 1 layer on the first stage and 3 on the last,
# or layers 0 and 2 on the first rank's two chunks, 1 and 3 on the second's.
DEEP_LAYERS = 4
# Dropout off in both, so that layouts can be compared exactly.
ARCHITECTURES = {"llama": LLAMA_ARCHITECTURE,
                 "gpt": dict(hidden_dropout=0.0, attention_dropout=0.0)}
CASES = [(arch, K) for arch in ARCHITECTURES for K in (1, 4)]
BATCH = 4


def _shape(deep):
    return dict(SHAPE, num_layers=DEEP_LAYERS) if deep else SHAPE


def _layer_offset(num_layers, pp, pp_rank, first_stage_layers, chunks, chunk, counted):
    """The model's index of a chunk's first layer (megatron-core's order, written out)."""
    if first_stage_layers is not None:
        rest = (num_layers - first_stage_layers) // (pp - 1)
        return 0 if pp_rank == 0 else first_stage_layers + (pp_rank - 1) * rest
    # The split's units in model order: [embedding,] layers [, loss]; chunk c of rank r is
    # virtual stage c*pp + r and holds the next per_chunk units.
    per_chunk = (num_layers + 2 * counted) // (pp * chunks)
    first_unit = (chunk * pp + pp_rank) * per_chunk
    return max(first_unit - counted, 0)


def _data(K, seed):
    g = torch.Generator().manual_seed(seed)
    window = torch.randint(0, SHAPE["vocab_size"], (BATCH, K * (SHAPE["seq_length"] + 1)), generator=g)
    mask = torch.ones(BATCH, K * SHAPE["seq_length"])
    mask[1, -K - 1:] = 0  # some masked targets, unevenly over the DP shards
    return window[:, :-K], window[:, K:], mask


def _layout_worker(tp, pp, sp, first_stage_layers, chunks, counted, full_weights):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from patch_megatron import parallel
    from patch_megatron.model.config import PatchGPTConfig
    from patch_megatron.model.patch_gpt import build_model

    virtual = chunks if chunks > 1 else None
    parallel.initialize(parallel.ParallelConfig(tp, pp, sp, cpu=True,
                                                virtual_pipeline_model_parallel_size=virtual),
                        seed=7)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    results = {}
    deep = first_stage_layers is not None or virtual is not None or counted
    shape = _shape(deep)
    for arch, K in CASES:
        cfg = PatchGPTConfig(**shape, **ARCHITECTURES[arch], patch_size=K,
                             tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                             sequence_parallel=sp,
                             num_layers_in_first_pipeline_stage=first_stage_layers,
                             virtual_pipeline_model_parallel_size=virtual,
                             account_for_embedding_in_pipeline_split=counted,
                             account_for_loss_in_pipeline_split=counted,
                             overlap_p2p_comm=virtual is not None)
        gated = arch == "llama"
        weights = full_weights[deep][arch, K]
        ddps, names = [], []
        for chunk in range(chunks):
            model = build_model(cfg, vp_stage=chunk if virtual else None)
            offset = _layer_offset(shape["num_layers"], pp, pp_rank, first_stage_layers, chunks,
                                   chunk, counted)
            names.append(lambda name, offset=offset: shifted_name(name, offset))
            local = {
                name: tp_slice(name, weights[names[-1](name)], tp, tp_rank, gated)
                for name in model.state_dict() if not name.endswith("_extra_state")
            }
            model.load_state_dict(local, strict=False)
            model.config.calculate_per_token_loss = True
            ddps.append(DistributedDataParallel(
                model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model))
        config = ddps[0].config
        config.no_sync_func = [ddp.no_sync for ddp in ddps] if virtual else ddps[0].no_sync
        config.finalize_model_grads_func = finalize_model_grads

        tokens, labels, mask = (t.chunk(dp)[dp_rank] for t in _data(K, seed=K))
        micro_batches = [dict(tokens=tokens[i:i + 1], labels=labels[i:i + 1], mask=mask[i:i + 1])
                         for i in range(tokens.shape[0])]

        def forward_step(data_iterator, chunk):
            batch = next(data_iterator)
            output = chunk(batch["tokens"], labels=batch["labels"])

            def loss_func(per_token):
                loss_sum = (per_token * batch["mask"]).sum()
                num_tokens = batch["mask"].sum().to(torch.int)
                return loss_sum, num_tokens, {"loss": torch.stack([loss_sum.detach(), num_tokens.float()])}

            return output, loss_func

        for ddp in ddps:
            ddp.zero_grad_buffer()
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(micro_batches) for _ in ddps] if virtual else iter(micro_batches),
            model=ddps, num_microbatches=tokens.shape[0], seq_length=SHAPE["seq_length"],
            micro_batch_size=1, forward_only=False,
        )
        grads = {name_of(n): p.main_grad.clone()
                 for ddp, name_of in zip(ddps, names) for n, p in ddp.module.named_parameters()}
        loss_and_count = torch.stack([d["loss"] for d in losses]).sum(0) if losses else None
        results[arch, K] = dict(grads=grads, loss_and_count=loss_and_count)
    layers = sorted({int(n.split(".")[2]) for n in grads if n.startswith("decoder.layers.")})
    result = dict(tp=(tp, tp_rank), pp_rank=pp_rank, dp_rank=dp_rank, results=results,
                  layers=layers)
    ps.destroy_model_parallel()  # the next layout builds its own groups on the same world
    return result


def _layouts_worker(layouts, full_weights):
    """Every layout in turn on the same two processes (one launch: each costs a megatron import)."""
    return {layout: _layout_worker(*layout, full_weights) for layout in layouts}


def _assemble(rank_results, case):
    """Full gradients and the global mean loss from the ranks' pieces."""
    loss_sum = count = 0.0
    pieces = {}
    for r in rank_results:
        (tp, tp_rank), res = r["tp"], r["results"][case]
        if res["loss_and_count"] is not None and tp_rank == 0:
            loss_sum += float(res["loss_and_count"][0])
            count += float(res["loss_and_count"][1])
        if r["dp_rank"] != 0:
            continue
        for name, g in res["grads"].items():
            pieces.setdefault(name, {})[tp_rank] = g
    gated = case[0] == "llama"
    full = {name: tp_concat(name, [by_rank[i] for i in sorted(by_rank)], gated)
            for name, by_rank in pieces.items()}
    return loss_sum / count, full


def _dp_replicas_agree(rank_results, case):
    """Data-parallel replicas of one model shard hold identical reduced gradients."""
    replicas = {}
    for r in rank_results:
        replicas.setdefault((r["tp"][1], r["pp_rank"]), []).append(r["results"][case]["grads"])
    return all(
        torch.equal(group[0][n], other[n])
        for group in replicas.values() for other in group[1:] for n in group[0]
    )


@pytest.fixture(scope="module")
def single_process_reference():
    """Weights and the TP=1/PP=1/DP=1 loss and gradients of the same models in this process,
    by whether the model is the deep one (the uneven and interleaved pipelines')."""
    from patch_megatron.parallel import initialize_world_of_one

    initialize_world_of_one(1234)
    return {deep: _single_process(_shape(deep)) for deep in (False, True)}


def _single_process(shape):
    from patch_megatron.model.config import PatchGPTConfig
    from patch_megatron.model.patch_gpt import build_model

    out = {}
    for arch, K in CASES:
        model = build_model(PatchGPTConfig(**shape, **ARCHITECTURES[arch], patch_size=K))
        tokens, labels, mask = _data(K, seed=K)
        loss = (model(tokens, labels=labels) * mask).sum() / mask.sum()
        loss.backward()
        out[arch, K] = dict(
            weights={k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")},
            loss=loss.detach(),
            grads={n: p.grad.clone() for n, p in model.named_parameters()},
        )
    return out


# (TP, PP, sequence parallel, layers on the first pipeline stage, model chunks per rank,
#  embedding and loss counted as layers in the split)
LAYOUTS = {"TP2": (2, 1, False, None, 1, False), "PP2": (1, 2, False, None, 1, False),
           "DP2": (1, 1, False, None, 1, False), "TP2-SP": (2, 1, True, None, 1, False),
           "PP2-uneven": (1, 2, False, 1, 1, False),
           "PP2-interleaved": (1, 2, False, None, 2, False),
           "PP2-interleaved-counted": (1, 2, False, None, 3, True)}
# Counted: units [embedding, 0, 1, 2, 3, loss], one per chunk: rank 0 holds the embedding, 1
# and 3; rank 1 holds 0, 2 and the loss.
HELD_LAYERS = {"PP2-uneven": {0: [0], 1: [1, 2, 3]}, "PP2-interleaved": {0: [0, 2], 1: [1, 3]},
               "PP2-interleaved-counted": {0: [1, 3], 1: [0, 2]}}


@pytest.fixture(scope="module")
def two_process_results(single_process_reference):
    """Each layout's per-rank results, all from one two-process launch."""
    weights = {uneven: {case: ref["weights"] for case, ref in cases.items()}
               for uneven, cases in single_process_reference.items()}
    ranks = run_on_ranks(_layouts_worker, 2, list(LAYOUTS.values()), weights)
    return {name: [r[layout] for r in ranks] for name, layout in LAYOUTS.items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, two_process_results, single_process_reference):
    ranks = two_process_results[layout]
    deep = layout in HELD_LAYERS
    if deep:  # each pipeline rank built the layers it should
        assert {r["pp_rank"]: r["layers"] for r in ranks} == HELD_LAYERS[layout]
    for case, ref in single_process_reference[deep].items():
        loss, grads = _assemble(ranks, case)
        torch.testing.assert_close(torch.tensor(loss), ref["loss"], rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=f"{case} {name}")
        assert _dp_replicas_agree(ranks, case)
