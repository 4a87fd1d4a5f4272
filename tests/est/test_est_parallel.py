"""EST under TP=2 (with and without sequence parallelism), PP=2 and DP=2 against one process.

Each layout runs on two gloo processes through megatron's pipeline schedule,
DDP and finalize_model_grads with one global mask (skipped layers, dropped
query groups or heads inside groups, dropped MLP units) and must give the
single-process loss and gradients. DP=2 runs with overlap_grad_reduce, whose
per-bucket gradient-ready counting must not hang or assert on skipped layers.
"""

import pytest
import torch

from distributed_harness import run_on_ranks
from megatron_layout import global_name, tp_concat, tp_slice
from patch_megatron.llama_recipe import LLAMA_ARCHITECTURE

SHAPE = dict(num_layers=4, hidden_size=32, num_attention_heads=8, num_query_groups=4,
             ffn_hidden_size=48, vocab_size=64, seq_length=6, **LLAMA_ARCHITECTURE)
BATCH = 4
CASES = {1: "groups", 4: "heads"}  # patch size K -> GQA sampling mode


def _mask(mode):
    from patch_megatron.est.control import apply_subnetwork
    from patch_megatron.est.sampler import Layout, sample_subnetwork
    from patch_megatron.est.schedule import StageRates
    from patch_megatron.model.shape import ModelShape

    shape = ModelShape(num_layers=4, hidden_size=64, num_attention_heads=8, num_query_groups=4,
                       ffn_hidden_size=48, vocab_size=None)
    rates = StageRates(layers=0.5, heads=0.5, mlp_units=0.5)
    # Drawn for TP=2 x PP=2, so one mask is valid for every layout here.
    return sample_subnetwork(rates, shape, Layout(2, 2), seed=3, iteration=17, gqa_sampling=mode)


def _data(K):
    g = torch.Generator().manual_seed(K)
    window = torch.randint(0, SHAPE["vocab_size"], (BATCH, K * (SHAPE["seq_length"] + 1)), generator=g)
    return window[:, :-K], window[:, K:]


LAYOUTS = {"TP2(+SP)": (2, 1), "PP2": (1, 2), "DP2-overlap": (1, 1)}


def _worker(full_weights):
    """Every layout in one pair of processes (one launch: megatron's import dominates)."""
    from megatron.core import parallel_state as ps

    out = {}
    for name, (tp, pp) in LAYOUTS.items():
        out[name] = _run_layout(tp, pp, full_weights)
        ps.destroy_model_parallel()
    return out


def _run_layout(tp, pp, full_weights):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from patch_megatron import parallel
    from patch_megatron.est.control import apply_subnetwork
    from patch_megatron.est.sampler import Layout, sample_subnetwork
    from patch_megatron.est.schedule import StageRates
    from patch_megatron.model.config import PatchGPTConfig
    from patch_megatron.est.spec import subnetwork_block_spec
    from patch_megatron.model.patch_gpt import build_model

    parallel.initialize(parallel.ParallelConfig(tp, pp, cpu=True), seed=7)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_stage = SHAPE["num_layers"] // pp
    results = {}
    for K, mode in CASES.items():
        for sp in ((False, True) if tp > 1 else (False,)):
            cfg = PatchGPTConfig(**SHAPE, patch_size=K, tensor_model_parallel_size=tp,
                                 pipeline_model_parallel_size=pp, sequence_parallel=sp)
            model = build_model(cfg, layer_spec=subnetwork_block_spec)
            model.load_state_dict({n: tp_slice(n, full_weights[K][global_name(n, pp_rank, per_stage)], tp, tp_rank)
                                   for n in model.state_dict() if not n.endswith("_extra_state")},
                                  strict=False)
            config = model.config
            config.calculate_per_token_loss = True
            ddp = DistributedDataParallel(
                config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=dp > 1,
                                                      bucket_size=2000), model)
            config.no_sync_func = ddp.no_sync
            config.finalize_model_grads_func = finalize_model_grads
            tokens, labels = (t.chunk(dp)[dp_rank] for t in _data(K))

            def forward_step(data_iterator, chunk):
                x, y = next(data_iterator)

                def loss_func(per_token):
                    total = per_token.sum()
                    n = torch.tensor(per_token.numel(), dtype=torch.int)
                    return total, n, {"loss": torch.stack([total.detach(), n.float()])}

                return chunk(x, labels=y), loss_func

            # A full step first: DDP's first step records which parameters report gradients
            # (its "golden" counts); the EST step after it must report the same ones.
            for subnetwork in (None, _mask(mode)):
                assert apply_subnetwork([ddp], subnetwork) == per_stage
                batches = iter([(tokens[i:i + 1], labels[i:i + 1]) for i in range(tokens.shape[0])])
                ddp.zero_grad_buffer()
                losses = get_forward_backward_func()(
                    forward_step_func=forward_step, data_iterator=batches, model=[ddp],
                    num_microbatches=tokens.shape[0], seq_length=SHAPE["seq_length"],
                    micro_batch_size=1, forward_only=False)
            results[(K, sp)] = dict(
                grads={global_name(n, pp_rank, per_stage): p.main_grad.clone() for n, p in model.named_parameters()},
                loss=torch.stack([d["loss"] for d in losses]).sum(0) if losses else None)
    return dict(tp_rank=tp_rank, dp_rank=dp_rank, results=results)


def _assemble(ranks, key):
    loss_sum = count = 0.0
    pieces = {}
    for r in ranks:
        res = r["results"][key]
        if res["loss"] is not None and r["tp_rank"] == 0:
            loss_sum += float(res["loss"][0])
            count += float(res["loss"][1])
        if r["dp_rank"] == 0:
            for name, g in res["grads"].items():
                pieces.setdefault(name, {})[r["tp_rank"]] = g
    full = {name: tp_concat(name, [by_rank[i] for i in sorted(by_rank)])
            for name, by_rank in pieces.items()}
    return loss_sum / count, full


@pytest.fixture(scope="module")
def single_process():
    from patch_megatron.parallel import initialize_world_of_one
    from patch_megatron.est.control import apply_subnetwork
    from patch_megatron.est.sampler import Layout, sample_subnetwork
    from patch_megatron.est.schedule import StageRates
    from patch_megatron.model.config import PatchGPTConfig
    from patch_megatron.est.spec import subnetwork_block_spec
    from patch_megatron.model.patch_gpt import build_model

    initialize_world_of_one(1234)
    out = {}
    for K, mode in CASES.items():
        model = build_model(PatchGPTConfig(**SHAPE, patch_size=K), layer_spec=subnetwork_block_spec)
        apply_subnetwork([model], _mask(mode))
        tokens, labels = _data(K)
        loss = model(tokens, labels=labels).mean()
        loss.backward()
        out[K] = dict(weights={k: v.clone() for k, v in model.state_dict().items()
                               if not k.endswith("_extra_state")},
                      loss=loss.detach(), grads={n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                                     for n, p in model.named_parameters()})
    return out


def test_masks_skip_layers_and_drop_heads_and_units():
    for mode in CASES.values():
        mask = _mask(mode)
        assert [c is None for c in mask.layers].count(True) == 2
        kept = [c for c in mask.layers if c is not None]
        assert all(c.heads is not None and len(c.heads) == 4 and len(c.units) == 24 for c in kept)


@pytest.fixture(scope="module")
def layouts(single_process):
    return run_on_ranks(_worker, 2, {K: ref["weights"] for K, ref in single_process.items()})


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, layouts, single_process):
    ranks = [r[layout] for r in layouts]
    for key in ranks[0]["results"]:
        ref = single_process[key[0]]
        loss, grads = _assemble(ranks, key)
        torch.testing.assert_close(torch.tensor(loss), ref["loss"], rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=f"{key} {name}")
