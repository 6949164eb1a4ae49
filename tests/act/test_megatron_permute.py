"""permute_experts on real megatron-core MoELayers (SequentialMLP experts), 2 gloo processes on CPU,
expert-model-parallel size 2, 4 experts (2 per rank); and the same on 4 processes (EP 4, 8 experts, 2 per
rank: function, training, optimizer state, gradients; the refusals are the 2-rank run's).

This file is also the worker: pytest runs it under `torch.distributed.run` (_workers.launch); each rank
writes what it measured to rank<r>.json and the tests below check it. The CUDA-only calls megatron makes
are shimmed as in tests/tracing/_shims.py (`megatron_on_cpu`). Three identical models (same weights, each expert's
own seed, same per-rank inputs, torch AdamW): A is never permuted; B is permuted after step 2 with its
optimizer; C is permuted after step 2 without it (the control: Adam's moments stay behind, so its
losses must part from A's). All layers use the allgather dispatcher (the alltoall one: test_megatron_alltoall.py). Layer 0: top-2 softmax with aux loss; layer 1: sigmoid top-2 with expert bias (non-zero)
and a router bias; layer 2: top-1 with capacity factor 1, dropping by probability, and the global aux
loss (its running token counts per expert are router state too).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from _workers import (
    INVALID,
    MegatronNet,
    by_logical,
    check_refusals,
    check_training_identical,
    launch,
    max_diff,
    megatron_layer,
    megatron_on_cpu,
    megatron_step,
    megatron_world,
    refusals,
    rows,
    write_result,
)

H, TOKENS, STEPS = 16, 32, 5
MAPS_BY_WORLD = {  # after step 2: layers 0, 1, 2 (E = 2 x world experts, 2 per rank)
    2: ([1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0]),
    4: ([1, 0, 3, 2, 1, 0, 3, 2], [3, 3, 2, 2, 1, 1, 0, 0], [0, 1, 2, 3, 3, 2, 1, 0]),
}
MAPS, E = MAPS_BY_WORLD[2], 4
LAYERS = (
    dict(moe_router_topk=2, moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="aux_loss",
         moe_aux_loss_coeff=1e-2),
    dict(moe_router_topk=2, moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
         moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True),
    dict(moe_router_topk=1, moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="global_aux_loss",
         moe_aux_loss_coeff=1e-1, moe_router_pre_softmax=True, moe_expert_capacity_factor=1.0,
         moe_token_drop_policy="probs"),
)


def _worker(out: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    rank, world = megatron_world()
    from megatron.core import parallel_state

    from moeload.act.megatron import expert_to_rank, permute_experts
    from moeload.act.permute import phy2log
    from moeload.errors import InputError

    maps, E = MAPS_BY_WORLD[world], 2 * world
    L = E // world

    def make_layer(i: int, **kw: object) -> nn.Module:
        layer = megatron_layer(i, H, E, 3, **kw)
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]) if E == 4 else torch.linspace(0.3, -0.3, E))
            # a router bias, as add_bias_linear=True gives (which also gives the experts biases, and
            # megatron 0.16's expert MLP then fails on CPU: in-place add to a custom Function's view)
            layer.router.bias = nn.Parameter(0.1 * torch.randn(E))
        return layer

    def model() -> tuple[MegatronNet, torch.optim.Optimizer]:
        net = MegatronNet(0, len(LAYERS), lambda i: make_layer(i, **LAYERS[i]))  # the same routers in A, B, C
        return net, torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)

    gen = torch.Generator().manual_seed(1000 + rank)  # different tokens on each rank
    xs = [torch.randn(TOKENS, 1, H, generator=gen) for _ in range(STEPS)]
    x_fixed = torch.randn(TOKENS, 1, H, generator=gen)

    def step(net: MegatronNet, opt: torch.optim.Optimizer, t: int) -> float:
        return megatron_step(net, opt, xs[t])

    def logical(net: MegatronNet, opt: torch.optim.Optimizer) -> dict:
        """_workers.by_logical, with the router's rows as "router_<name>_<kind>" (weight, bias, buffers)."""
        layers = []
        for m in net.layers:
            e2r, r = expert_to_rank(m), m.router
            inv = np.argsort(phy2log(np.asarray(e2r)))  # logical -> slot
            router = {"weight": rows(r.weight, opt, inv)}
            if r.bias is not None:
                router["bias"] = rows(r.bias, opt, inv)
            for name in ("expert_bias", "local_tokens_per_expert", "global_tokens_per_expert"):
                if getattr(r, name, None) is not None:
                    router[name] = {"param": getattr(r, name)[inv].tolist()}
            layers.append((e2r, m.experts.local_experts,
                           {f"router_{name}_{k}": v for name, kinds in router.items() for k, v in kinds.items()}))
        return by_logical(layers, opt)

    res: dict = {"rank": rank}
    with megatron_on_cpu():
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
        res["ep_size"] = parallel_state.get_expert_model_parallel_world_size()
        (A, oa), (B, ob), (C, oc) = model(), model(), model()
        res["experts_class"] = type(B.layers[0].experts).__name__
        res["same_group"] = B.layers[0].ep_group is parallel_state.get_expert_model_parallel_group()
        losses: dict = {"A": [step(A, oa, t) for t in range(STEPS)], "B": [], "C": []}
        for t in range(STEPS):
            if t == 2:
                if world == 2:  # (c) invalid maps raise on the calling rank alone, before any communication
                    res.update(refusals(permute_experts, expert_to_rank, B.layers[0], INVALID, maps[0], ob))

                # (a) the function is unchanged by a non-trivial permutation
                with torch.no_grad():
                    out_before = [B(x_fixed)]
                    experts_before = [p.detach().clone() for m in B.layers for p in m.experts.parameters()]
                    res["stats"] = [permute_experts(m, mp, ob) for m, mp in zip(B.layers, maps)]
                    out_before.append(B(x_fixed))
                    experts_after = [p for m in B.layers for p in m.experts.parameters()]
                res["out"] = [float(o) for o in out_before]
                res["experts_changed"] = sum(not torch.equal(a, b) for a, b in zip(experts_before, experts_after))
                for m, mp in zip(C.layers, maps):
                    permute_experts(m, mp)  # control: without the optimizer
            losses["B"].append(step(B, ob, t))
            losses["C"].append(step(C, oc, t))
        res["losses"] = losses
        res["maps"] = [expert_to_rank(m) for m in B.layers]
        res["diff_B"] = max_diff(logical(A, oa), logical(B, ob))
        res["diff_C"] = max_diff(logical(A, oa), logical(C, oc))
        # gradients move too: a backward without a step, then B goes back to the contiguous layout
        for net in (A, B):
            net(xs[0]).backward()
        res["stats_back"] = [permute_experts(m, np.arange(E) // L, ob) for m in B.layers]
        res["diff_back"] = max_diff(logical(A, oa), logical(B, ob))
        try:
            if world != 2:
                raise InputError("group-limited routing: checked on 2 ranks")
            grouped = make_layer(0, moe_router_topk=2, moe_router_num_groups=2, moe_router_group_topk=1)
            permute_experts(grouped, MAPS[0])
            res["grouped_error"] = None
        except InputError as e:
            res["grouped_error"] = str(e)
        parallel_state.destroy_model_parallel()
    write_result(out, res)
    dist.destroy_process_group()


pytest.importorskip("megatron.core")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """This file as the worker on 2 gloo ranks -> what each rank measured."""
    return launch(__file__, tmp_path_factory.mktemp("mcore_permute"))


def _moved(m: list[int], world: int) -> int:
    """Experts whose rank differs between the contiguous layout and map m."""
    return sum(r != e // 2 for e, r in enumerate(m))


@pytest.mark.slow
def test_function_unchanged_by_permutation(ranks):
    for r in ranks:
        assert r["ep_size"] == 2 and r["experts_class"] == "SequentialMLP" and r["same_group"]
        assert r["experts_changed"] > 0  # weights really moved on this rank
        np.testing.assert_allclose(r["out"][1], r["out"][0], rtol=1e-6)
        assert r["maps"] == [list(m) for m in MAPS]
    s0, s1 = ranks[0]["stats"], ranks[1]["stats"]
    assert [s["experts_moved"] for s in s0] == [2, 4, 2]
    # one expert's fc1 [2H, H] and fc2 [H, 2H] with exp_avg, exp_avg_sq
    # (float32) and two scalar steps; grads are None at the step boundary
    assert s0[0]["bytes_sent"] == s0[0]["bytes_received"] == s1[0]["bytes_sent"] == 4 * (3 * 4 * H * H + 2)
    assert s0[1]["bytes_total"] == 2 * s0[0]["bytes_total"] == 4 * s0[0]["bytes_sent"]  # all four experts move


@pytest.mark.slow
def test_training_identical_and_optimizer_state_moved(ranks):
    check_training_identical(ranks, {"param", "exp_avg", "exp_avg_sq", "step", "router_weight_param",
                                     "router_weight_exp_avg", "router_bias_exp_avg", "router_expert_bias_param",
                                     "router_local_tokens_per_expert_param", "router_global_tokens_per_expert_param"})


@pytest.mark.slow
def test_gradients_move_and_the_contiguous_layout_comes_back(ranks):
    for r in ranks:
        assert {"grad", "router_weight_grad", "router_bias_grad"} <= set(r["diff_back"])
        assert max(r["diff_back"].values()) <= 1e-6, r["diff_back"]
        # from MAPS back to contiguous: as many experts as before, each now with its two gradients
        assert [s["experts_moved"] for s in r["stats_back"]] == [2, 4, 2]
        assert r["stats_back"][0]["bytes_sent"] == 4 * (4 * 4 * H * H + 2)


@pytest.mark.slow
def test_invalid_maps_raise_on_every_rank_before_communication(ranks):
    check_refusals(ranks)
    for r in ranks:
        assert "group-limited routing (moe_router_num_groups=2)" in r["grouped_error"]


@pytest.mark.slow
def test_four_ranks_function_training_and_state(tmp_path):
    """EP 4 on 4 gloo processes, 8 experts: the permutation keeps the function, B trains as A with its state
    (Adam moments, router rows and buffers) by logical expert, C (without its optimizer) parts from A, and
    gradients move back to the contiguous layout with the experts."""
    rs = launch(__file__, tmp_path, nproc=4, timeout=400)
    maps = MAPS_BY_WORLD[4]
    for r in rs:
        assert r["ep_size"] == 4 and r["experts_class"] == "SequentialMLP" and r["same_group"]
        assert r["experts_changed"] > 0
        np.testing.assert_allclose(r["out"][1], r["out"][0], rtol=1e-6)
        assert r["maps"] == [list(m) for m in maps]
        assert [s["experts_moved"] for s in r["stats"]] == [_moved(m, 4) for m in maps]
        assert max(r["diff_back"].values()) <= 1e-6, r["diff_back"]
    check_training_identical(rs, {"param", "exp_avg", "exp_avg_sq", "step", "router_weight_param",
                                  "router_expert_bias_param", "router_global_tokens_per_expert_param"})


def test_not_a_megatron_moe_layer_is_refused_without_communication():
    import torch

    from moeload.act.megatron import permute_experts
    from moeload.errors import InputError

    with pytest.raises(InputError, match="expected a megatron-core MoELayer, got Linear"):
        permute_experts(torch.nn.Linear(2, 2), [0, 1])


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
