"""permute_experts on real megatron-core MoELayers with GroupedMLP experts (the local spec with
moe_grouped_gemm=True), 2 gloo processes on CPU, expert-model-parallel size 2, 4 experts (2 per rank).

This file is also the worker: pytest runs it under `torch.distributed.run` (_workers.launch) once; each rank
writes what it measured to rank<r>.json and the tests below check it. Shims: `megatron_on_cpu`
(tests/tracing/_shims.py) and `grouped_gemm_on_cpu` (tests/tracing/_shims_grouped.py: the grouped_gemm
package and its CUDA kernel `gmm`, replaced by an exact per-expert loop of torch.matmul). GroupedMLP's forward
asserts `config.bf16`; the configs set that flag, and the parameters stay fp32 (`params_dtype`), so every
tensor here is fp32. megatron wraps GroupedMLP's activation in torch.compile (`jit_fuser`); the worker runs
it eagerly (`torch._dynamo.config.disable`): Inductor's CPU compile and recompiles would take most of the
time budget. GroupedMLP's local expert j is chunk j of `weight1.view(L, H, -1)` and `weight2.view(L, -1, H)`
(megatron's forward); the checks read it from there, not through moeload.

Three identical models (same weights, each logical expert's own seed, same per-rank inputs, torch AdamW),
all traced by a LoadTracer except C: A is never permuted; B is permuted after step 2 with its optimizer (and
records the new maps in its trace); C is permuted after step 2 without it (the control). Layer 0: top-2
softmax with aux loss, GELU experts; layer 1: sigmoid top-2 with expert bias (non-zero) and gated linear
units (SiLU; weight1 holds 2F columns per expert). Allgather dispatcher (the alltoall one needs CUDA streams).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from _workers import (
    INVALID,
    MegatronNet,
    check_refusals,
    check_training_identical,
    launch,
    max_diff,
    megatron_on_cpu,
    megatron_step,
    megatron_world,
    refusals,
    rows,
    write_result,
)

H, F, TOKENS, STEPS, E = 16, 32, 32, 5, 4
MAPS = ([1, 0, 1, 0], [1, 1, 0, 0])  # after step 2: layers 0, 1
LAYERS = (
    dict(moe_router_topk=2, moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2),
    dict(moe_router_topk=2, moe_router_load_balancing_type="none", moe_router_score_function="sigmoid",
         moe_router_enable_expert_bias=True, gated_linear_unit=True, activation_func="silu"),
)


def grouped_layer(i: int, num_layers: int, **config: object) -> object:
    """MoELayer number i + 1 with GroupedMLP experts over the whole world (fp32 parameters, the bf16 flag
    for GroupedMLP's assert); logical expert e's chunks of weight1 and weight2 get 0.3 x N(0, 1) from seed
    100 i + e."""
    import warnings

    import torch
    import torch.distributed as dist
    import torch.nn.functional as fn

    rank, world = dist.get_rank(), dist.get_world_size()
    L = E // world
    if config.get("activation_func") == "silu":
        config["activation_func"] = fn.silu
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.models.gpt import gpt_layer_specs
        from megatron.core.transformer.moe.moe_layer import MoELayer
        from megatron.core.transformer.transformer_config import TransformerConfig

        cfg = TransformerConfig(num_layers=num_layers, hidden_size=H, num_attention_heads=2, ffn_hidden_size=F,
                                num_moe_experts=E, expert_model_parallel_size=world, use_cpu_initialization=True,
                                params_dtype=torch.float32, bf16=True, add_bias_linear=False,
                                moe_token_dispatcher_type="allgather", moe_grouped_gemm=True, **config)
        spec = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=True).submodules.mlp
        layer = MoELayer(config=cfg, submodules=spec.submodules, layer_number=i + 1)
    layer.set_layer_number(i + 1)
    ex = layer.experts
    with torch.no_grad():
        for j in range(L):
            g = torch.Generator().manual_seed(100 * i + rank * L + j)
            for w in (ex.weight1.view(L, H, -1)[j], ex.weight2.view(L, -1, H)[j]):
                w.copy_(0.3 * torch.randn(w.shape, generator=g))
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    return layer


def _worker(out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tracing"))
    import torch
    import torch._dynamo
    import torch.distributed as dist
    from _shims_grouped import grouped_gemm_on_cpu

    torch._dynamo.config.disable = True  # megatron's jit_fuser (torch.compile) runs eagerly: see the docstring
    rank, world = megatron_world()
    from megatron.core import parallel_state

    from moeload import LoadTracer
    from moeload.act.megatron import expert_to_rank, permute_experts
    from moeload.act.permute import phy2log

    L = E // world

    def model() -> tuple[MegatronNet, torch.optim.Optimizer]:
        net = MegatronNet(0, len(LAYERS), lambda i: grouped_layer(i, len(LAYERS), **LAYERS[i]))
        return net, torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)

    gen = torch.Generator().manual_seed(1000 + rank)  # different tokens on each rank
    xs = [torch.randn(TOKENS, 1, H, generator=gen) for _ in range(STEPS)]
    x_fixed = torch.randn(TOKENS, 1, H, generator=gen)

    def chunk(t: torch.Tensor, k: int) -> torch.Tensor:
        """weight1-shaped (k = 0) or weight2-shaped (k = 1) t -> [L, ...], as GroupedMLP.forward views it."""
        return t.view(L, H, -1) if k == 0 else t.view(L, -1, H)

    def logical(net: MegatronNet, opt: torch.optim.Optimizer) -> dict:
        """The state by logical expert over the world, in _workers.by_logical's form ({layer: ({expert: {0:
        weight1's chunk, 1: weight2's: {"param", "grad", state key: list or float}}}, router rows)})."""
        mine = {}
        for li, m in enumerate(net.layers):
            e2r, r = expert_to_rank(m), m.router
            p2l = phy2log(np.asarray(e2r))
            router = {"router_weight_" + k: v for k, v in rows(r.weight, opt, np.argsort(p2l)).items()}
            if r.expert_bias is not None:
                router["router_expert_bias_param"] = r.expert_bias[np.argsort(p2l)].tolist()
            ws = (m.experts.weight1, m.experts.weight2)
            experts = {int(p2l[rank * L + j]): {
                k: {"param": chunk(w.detach(), k)[j].tolist(),
                    **({} if w.grad is None else {"grad": chunk(w.grad, k)[j].tolist()}),
                    **{s: (chunk(t, k)[j].tolist() if t.dim() else float(t)) for s, t in opt.state.get(w, {}).items()}}
                for k, w in enumerate(ws)} for j in range(L)}
            mine[li] = (experts, router)
        every: list = [None] * world
        dist.all_gather_object(every, mine)
        return {li: ({e: v for x in every for e, v in x[li][0].items()}, mine[li][1]) for li in mine}

    def train(net: MegatronNet, opt: torch.optim.Optimizer, name: str | None, permute: bool | None) -> list[float]:
        """STEPS steps (traced into out/<name> where given); after step 2, permute with (True) or without
        (False) the optimizer, or not (None)."""
        losses = []
        tracer = LoadTracer(net, out / name, flush_every=STEPS, fsync=False).start() if name else None
        for t in range(STEPS):
            if t == 2 and permute is not None:
                if permute:  # the function is unchanged by a non-trivial permutation (eval: not traced)
                    net.eval()
                    with torch.no_grad():
                        before = [net(x_fixed)]
                        weights = [p.detach().clone() for p in net.parameters()]
                        res["stats"] = [permute_experts(m, mp, opt) for m, mp in zip(net.layers, MAPS)]
                        before.append(net(x_fixed))
                    net.train()
                    res["out"] = [float(o) for o in before]
                    res["weights_changed"] = sum(not torch.equal(w, p) for w, p in zip(weights, net.parameters()))
                else:
                    for m, mp in zip(net.layers, MAPS):
                        permute_experts(m, mp)
                if tracer is not None:
                    for li, mp in enumerate(MAPS):
                        tracer.record_rank_map(tracer.step_count, li, mp, phy2log=phy2log(np.asarray(mp)).tolist())
            losses.append(megatron_step(net, opt, xs[t]))
            if tracer is not None:
                tracer.step()
        if tracer is not None:
            tracer.close()
        return losses

    res: dict = {"rank": rank}
    with megatron_on_cpu(), grouped_gemm_on_cpu():
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
        (A, oa), (B, ob), (C, oc) = model(), model(), model()
        ex = B.layers[1].experts
        res["experts"] = [type(m.experts).__name__ for m in B.layers]
        res["weight_shapes"] = [list(ex.weight1.shape), list(ex.weight2.shape)]
        res.update(refusals(permute_experts, expert_to_rank, B.layers[0], INVALID, MAPS[0], ob))
        res["losses"] = {"A": train(A, oa, "a", None), "B": train(B, ob, "b", True), "C": train(C, oc, None, False)}
        res["maps"] = [expert_to_rank(m) for m in B.layers]
        res["diff_B"] = max_diff(logical(A, oa), logical(B, ob))
        res["diff_C"] = max_diff(logical(A, oa), logical(C, oc))
        from moeload.act.loop import expert_shape

        res["state_bytes_per_param"] = [expert_shape(m, ob).state_bytes_per_param for m in B.layers]  # Adam: 3 x 4
        # gradients move too: a backward without a step, then B goes back to the contiguous layout
        for net in (A, B):
            net(xs[0]).backward()
        res["stats_back"] = [permute_experts(m, np.arange(E) // L, ob) for m in B.layers]
        res["diff_back"] = max_diff(logical(A, oa), logical(B, ob))
        res["maps_back"] = [expert_to_rank(m) for m in B.layers]
        parallel_state.destroy_model_parallel()
    write_result(out, res)
    dist.destroy_process_group()


pytest.importorskip("megatron.core")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    """This file as the worker on 2 gloo ranks -> (its output directory, what each rank measured)."""
    out = tmp_path_factory.mktemp("mcore_grouped")
    return out, launch(__file__, out)


def _expert_bytes(f1: int, copies: int) -> int:
    """One expert's payload: its chunks of weight1 [H, f1] and weight2 [F, H] (fp32), `copies` tensors of
    each (param, exp_avg, exp_avg_sq, and grad where present), and one fp32 Adam step per chunk."""
    return 4 * (copies * (H * f1 + F * H) + 2)


@pytest.mark.slow
def test_function_unchanged_by_permutation(ranks):
    _, rs = ranks
    for r in rs:
        assert r["experts"] == ["GroupedMLP"] * 2 and r["weight_shapes"] == [[H, 2 * 2 * F], [2 * F, H]]
        assert r["weights_changed"] == 6  # weight1, weight2, router weight of both layers really changed
        np.testing.assert_allclose(r["out"][1], r["out"][0], rtol=1e-6)
        assert r["maps"] == [list(m) for m in MAPS]
        # layer 0: experts 0 and 3 change rank, 1 and 2 move within theirs; layer 1: all four change rank
        assert [s["experts_moved"] for s in r["stats"]] == [2, 4]
        s0, s1 = r["stats"]
        assert s0["bytes_sent"] == s0["bytes_received"] == _expert_bytes(F, 3)
        assert s0["bytes_total"] == 2 * _expert_bytes(F, 3)
        assert s1["bytes_sent"] == s1["bytes_received"] == 2 * _expert_bytes(2 * F, 3)  # GLU: 2F columns
        assert s1["bytes_total"] == 4 * _expert_bytes(2 * F, 3)


@pytest.mark.slow
def test_training_identical_and_optimizer_state_moved(ranks):
    for r in ranks[1]:  # the Replacer's cost model reads the optimizer state of the whole weight tensors
        # param + exp_avg + exp_avg_sq, fp32, and the step counters rounding up (the per-expert views gave 4)
        assert all(12 <= b <= 13 for b in r["state_bytes_per_param"]), r["state_bytes_per_param"]
    check_training_identical(ranks[1], {"param", "exp_avg", "exp_avg_sq", "step", "router_weight_param",
                                        "router_weight_exp_avg", "router_expert_bias_param"})


@pytest.mark.slow
def test_gradients_move_and_the_contiguous_layout_comes_back(ranks):
    for r in ranks[1]:
        assert {"grad", "router_weight_grad"} <= set(r["diff_back"])
        assert max(r["diff_back"].values()) <= 1e-6, r["diff_back"]
        assert r["maps_back"] == [[0, 0, 1, 1]] * 2
        assert [s["experts_moved"] for s in r["stats_back"]] == [2, 4]
        assert r["stats_back"][0]["bytes_sent"] == _expert_bytes(F, 4)  # now with the gradient's chunks
        assert r["stats_back"][1]["bytes_sent"] == 2 * _expert_bytes(2 * F, 4)


@pytest.mark.slow
def test_invalid_maps_raise_on_every_rank_before_communication(ranks):
    check_refusals(ranks[1])


@pytest.mark.slow
def test_tracer_counts_logical_experts_across_the_permutation(ranks):
    from moeload import open_trace

    out, _ = ranks
    a, b = open_trace(out / "a"), open_trace(out / "b")
    assert a.meta["rank_map_changes"] == []
    assert b.meta["rank_map_changes"] == [{"step": 2, "layer": li, "expert_to_rank": list(m)}
                                          for li, m in enumerate(MAPS)]
    np.testing.assert_array_equal(b.counts(), a.counts())
    assert b.counts().sum() == a.counts().sum() == STEPS * 2 * 2 * TOKENS * 2  # steps, layers, ranks, tokens, top-2
    c, ga, gb = a.counts(), a.gpu_loads(), b.gpu_loads()  # [S, L, E], [S, L, ranks]
    np.testing.assert_array_equal(gb[:2], ga[:2])
    for li, m in enumerate(MAPS):  # from step 2 on, each rank's load is that of the experts the map puts there
        want = np.stack([c[2:, li, np.asarray(m) == g].sum(-1) for g in range(2)], -1)
        np.testing.assert_array_equal(gb[2:, li], want)
    assert not np.array_equal(gb[2:], ga[2:])  # (layer 1's two busy experts, 0 and 2, stay on different ranks)


def test_te_grouped_mlp_is_refused_without_communication():
    import torch

    from moeload.act.megatron import expert_to_rank, permute_experts
    from moeload.errors import InputError

    class TEGroupedMLP(torch.nn.Module):  # stands in for megatron's class of that name (needs Transformer Engine)
        pass

    layer = torch.nn.Module()
    layer.router, layer.experts, layer.local_expert_indices = torch.nn.Linear(2, 4), TEGroupedMLP(), [0, 1, 2, 3]
    for call in (lambda: expert_to_rank(layer), lambda: permute_experts(layer, [0, 0, 0, 0])):
        with pytest.raises(InputError, match="TEGroupedMLP experts .Transformer Engine. are not supported"):
            call()


def test_gmm_shim_is_the_per_expert_product():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tracing"))
    import torch
    from _shims_grouped import gmm

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 3, generator=g), torch.randn(3, 3, 5, generator=g)
    sizes = torch.tensor([4, 0, 3])
    want = torch.cat([a[:4] @ b[0], a[4:] @ b[2]])
    torch.testing.assert_close(gmm(a, b, sizes), want, rtol=0, atol=0)
    torch.testing.assert_close(gmm(a, b.transpose(1, 2), sizes, trans_b=True), want, rtol=0, atol=0)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
