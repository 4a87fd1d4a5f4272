"""TP=2, PP=2 (even, and uneven: 1 + 2 of 3 layers), DP=2 and TP=2 with sequence
parallelism against TP=1/PP=1/DP=1.

Each layout runs on two real gloo processes through megatron-core's own
pipeline schedule, DDP and finalize_model_grads, for K=1 and K=4 and for both
architectures (the paper's LLaMA and Megatron-LM's default GPT: LayerNorm
biases, learned positions, linear biases, GeLU), on the same full weights and
data as the single-process model; loss and every gathered gradient must match.
"""

import pytest
import torch

from distributed_harness import run_on_ranks
from megatron_layout import global_name, tp_concat, tp_slice
from patch_megatron.llama_recipe import LLAMA_ARCHITECTURE

SHAPE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=48, vocab_size=64, seq_length=6)
UNEVEN_LAYERS = 3  # the uneven pipeline's model: 1 layer on the first stage, 2 on the last
# Dropout off in both, so that layouts can be compared exactly.
ARCHITECTURES = {"llama": LLAMA_ARCHITECTURE,
                 "gpt": dict(hidden_dropout=0.0, attention_dropout=0.0)}
CASES = [(arch, K) for arch in ARCHITECTURES for K in (1, 4)]
BATCH = 4


def _shape(first_stage_layers):
    return SHAPE if first_stage_layers is None else dict(SHAPE, num_layers=UNEVEN_LAYERS)


def _data(K, seed):
    g = torch.Generator().manual_seed(seed)
    window = torch.randint(0, SHAPE["vocab_size"], (BATCH, K * (SHAPE["seq_length"] + 1)), generator=g)
    mask = torch.ones(BATCH, K * SHAPE["seq_length"])
    mask[1, -K - 1:] = 0  # some masked targets, unevenly over the DP shards
    return window[:, :-K], window[:, K:], mask


def _layout_worker(tp, pp, sp, first_stage_layers, full_weights):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from patch_megatron import parallel
    from patch_megatron.model.config import PatchGPTConfig
    from patch_megatron.model.patch_gpt import build_model

    parallel.initialize(parallel.ParallelConfig(tp, pp, sp, cpu=True), seed=7)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    results = {}
    shape = _shape(first_stage_layers)
    for arch, K in CASES:
        cfg = PatchGPTConfig(**shape, **ARCHITECTURES[arch], patch_size=K,
                             tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                             sequence_parallel=sp,
                             num_layers_in_first_pipeline_stage=first_stage_layers)
        model = build_model(cfg)
        if first_stage_layers is None:
            layers_per_stage = shape["num_layers"] // pp
        else:
            layers_per_stage = (shape["num_layers"] - first_stage_layers) // (pp - 1)

        def global_name_of(name):
            return global_name(name, pp_rank, layers_per_stage, first_stage_layers)

        gated = arch == "llama"
        weights = full_weights[first_stage_layers is not None][arch, K]
        local = {
            name: tp_slice(name, weights[global_name_of(name)], tp, tp_rank, gated)
            for name in model.state_dict() if not name.endswith("_extra_state")
        }
        model.load_state_dict(local, strict=False)
        config = model.config
        config.calculate_per_token_loss = True
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        config.no_sync_func = ddp.no_sync
        config.finalize_model_grads_func = finalize_model_grads

        tokens, labels, mask = (t.chunk(dp)[dp_rank] for t in _data(K, seed=K))
        micro_batches = iter([dict(tokens=tokens[i:i + 1], labels=labels[i:i + 1], mask=mask[i:i + 1])
                              for i in range(tokens.shape[0])])

        def forward_step(data_iterator, chunk):
            batch = next(data_iterator)
            output = chunk(batch["tokens"], labels=batch["labels"])

            def loss_func(per_token):
                loss_sum = (per_token * batch["mask"]).sum()
                num_tokens = batch["mask"].sum().to(torch.int)
                return loss_sum, num_tokens, {"loss": torch.stack([loss_sum.detach(), num_tokens.float()])}

            return output, loss_func

        ddp.zero_grad_buffer()
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=micro_batches, model=[ddp],
            num_microbatches=tokens.shape[0], seq_length=SHAPE["seq_length"], micro_batch_size=1,
            forward_only=False,
        )
        grads = {global_name_of(n): p.main_grad.clone() for n, p in model.named_parameters()}
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
    by whether the model is the uneven pipeline's."""
    from patch_megatron.parallel import initialize_world_of_one

    initialize_world_of_one(1234)
    return {uneven: _single_process(_shape(1 if uneven else None)) for uneven in (False, True)}


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


# (TP, PP, sequence parallel, layers on the first pipeline stage)
LAYOUTS = {"TP2": (2, 1, False, None), "PP2": (1, 2, False, None), "DP2": (1, 1, False, None),
           "TP2-SP": (2, 1, True, None), "PP2-uneven": (1, 2, False, 1)}


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
    uneven = LAYOUTS[layout][3] is not None
    if uneven:  # the first stage built one layer, the last two
        assert {r["pp_rank"]: r["layers"] for r in ranks} == {0: [0], 1: [1, 2]}
    for case, ref in single_process_reference[uneven].items():
        loss, grads = _assemble(ranks, case)
        torch.testing.assert_close(torch.tensor(loss), ref["loss"], rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=f"{case} {name}")
        assert _dp_replicas_agree(ranks, case)
