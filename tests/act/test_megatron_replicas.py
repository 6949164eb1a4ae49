"""Expert replicas for megatron-core (moeload.act.megatron_replicas) on real MoELayers (SequentialMLP experts,
allgather dispatcher), gloo processes on CPU: 2 ranks (4 logical experts in 6 slots) and 4 ranks (8 in 12);
one free slot per rank.

This file is also the worker: pytest runs it under `torch.distributed.run` (_workers.launch); each rank
writes what it measured to rank<r>.json. Three runs from the same weights and inputs: A is the plain model
(E experts); B has E + world slots with replica routers, and from step 2 each layer's busiest expert (over
all ranks) gets a copy on the next rank (on 4 ranks, layer 0's gets a second copy two ranks on), its
gradients summed by sync_replica_grads; after step 4 layer 1's copy is removed. C is B without
sync_replica_grads (the control). A and B are traced by a LoadTracer. The routers are those of
test_megatron_permute.py: layer 0 top-2 softmax with aux loss; layer 1 sigmoid top-2 with a non-zero
expert bias and a router bias; layer 2 top-1 with capacity factor 1 (drops) and the global aux loss.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from _workers import MegatronNet, launch, megatron_layer, megatron_on_cpu, megatron_step, megatron_world, write_result

H, TOKENS, STEPS, K, REMOVE = 16, 32, 7, 2, 4
LAYERS = (
    dict(moe_router_topk=2, moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="aux_loss",
         moe_aux_loss_coeff=1e-2),
    dict(moe_router_topk=2, moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
         moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True),
    dict(moe_router_topk=1, moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="global_aux_loss",
         moe_aux_loss_coeff=1e-1, moe_router_pre_softmax=True, moe_expert_capacity_factor=1.0,
         moe_token_drop_policy="probs"),
)
ROUTER_STATE = ("weight", "bias", "expert_bias", "local_tokens_per_expert", "global_tokens_per_expert")


def _worker(out: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    rank, world = megatron_world()
    from megatron.core import parallel_state

    from moeload import LoadTracer
    from moeload.act import megatron as act_mg
    from moeload.act.megatron_replicas import (
        add_replica,
        enable_replicas,
        remove_replica,
        replica_router,
        sync_replica_grads,
    )
    from moeload.errors import InputError

    E, S, L, Ls = 2 * world, 3 * world, 2, 3

    def plain_layer(i: int) -> nn.Module:
        layer = megatron_layer(i, H, E, len(LAYERS), **LAYERS[i])
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.copy_(torch.linspace(0.3, -0.2, E))
            layer.router.bias = nn.Parameter(0.1 * torch.randn(E))
        return layer

    res: dict = {"rank": rank}
    with megatron_on_cpu():
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
        A = MegatronNet(0, len(LAYERS), plain_layer)
        oa = torch.optim.AdamW(A.parameters(), lr=1e-2, weight_decay=0.1)

        def replica_net() -> tuple[MegatronNet, torch.optim.Optimizer]:
            net = MegatronNet(1, len(LAYERS), lambda i: megatron_layer(i, H, S, len(LAYERS), seed=7, **LAYERS[i]))
            with torch.no_grad():
                for a, b in zip(A.layers, net.layers):
                    r = enable_replicas(b, E)
                    r.weight.copy_(a.router.weight)
                    if a.router.bias is not None:
                        r.bias = nn.Parameter(a.router.bias.detach().clone())
                    if a.router.expert_bias is not None:
                        r.expert_bias.copy_(a.router.expert_bias)
                    for j, ex in enumerate(a.experts.local_experts):  # logical rank * L + j -> its home slot
                        for p, q in zip(ex.parameters(), b.experts.local_experts[j].parameters()):
                            q.copy_(p)
            return net, torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)

        (B, ob), (C, oc) = replica_net(), replica_net()
        res["router_class"] = type(B.layers[0].router).__name__
        routed_a: list = [None] * len(LAYERS)  # A's last routing map per layer, summed over tokens [E]
        for li, m in enumerate(A.layers):
            m.router.register_forward_hook(lambda mod, i, o, li=li: routed_a.__setitem__(li, o[1].sum(0).tolist()))

        gen = torch.Generator().manual_seed(1000 + rank)
        xs = [torch.randn(TOKENS, 1, H, generator=gen) for _ in range(STEPS)]
        x_fixed = torch.randn(TOKENS, 1, H, generator=gen)
        tracers = {n: LoadTracer(net, out / n, flush_every=2, fsync=False).start() for n, net in (("a", A), ("b", B))}
        losses: dict = {"A": [], "B": [], "C": []}
        hot: list = []
        counts: list = []  # per step >= K, per layer: (A's logical routes [E], B's routes per slot [S]), this rank
        for t in range(STEPS):
            if t == K:
                for li, (mb, mc) in enumerate(zip(B.layers, C.layers)):
                    r = replica_router(mb)
                    routed = torch.zeros(E + 1, dtype=torch.int64).index_add_(0, r.slot_logical, r.slot_counts)[:E]
                    dist.all_reduce(routed)  # the last step's routes per logical expert, all ranks
                    e = int(routed.argmax())
                    dsts = [(e // L + 1) % world] + ([(e // L + 2) % world] if world == 4 and li == 0 else [])
                    for d in dsts:
                        res.setdefault("added", []).append(add_replica(mb, e, d * Ls + L, ob))
                        add_replica(mc, e, d * Ls + L, oc)
                    hot.append(e)
                with torch.no_grad():  # the function, right after the copies were added
                    res["out"] = [float(A(x_fixed)), float(B(x_fixed))]
            if t == REMOVE:
                slot = (hot[1] // L + 1) % world * Ls + L  # the copy added at step K
                remove_replica(B.layers[1], slot)
                remove_replica(C.layers[1], slot)
            losses["A"].append(megatron_step(A, oa, xs[t]))
            losses["B"].append(megatron_step(B, ob, xs[t],
                                             lambda: res.setdefault("sync", []).append(sync_replica_grads(B))))
            losses["C"].append(megatron_step(C, oc, xs[t]))
            if t >= K:
                counts.append([(routed_a[li], replica_router(m).slot_counts.tolist()) for li, m in enumerate(B.layers)])
            for tr in tracers.values():
                tr.step()
        for tr in tracers.values():
            tr.close()
        res.update(losses=losses, hot=hot, counts=counts, slots=[replica_router(m).slot_expert for m in B.layers])

        def slots_state(net: MegatronNet, opt: torch.optim.Optimizer) -> dict:
            """Every expert slot of the group: {"layer/slot": {"param"|"exp_avg"|"exp_avg_sq": flat list}}."""
            d = {}
            for li, m in enumerate(net.layers):
                for j, ex in enumerate(m.experts.local_experts):
                    ps = list(ex.parameters())
                    d[f"{li}/{rank * Ls + j}"] = {
                        "param": torch.cat([p.detach().reshape(-1) for p in ps]).tolist(),
                        **{k: torch.cat([opt.state[p][k].reshape(-1) for p in ps]).tolist()
                           for k in ("exp_avg", "exp_avg_sq")}}
            every: list = [None] * world
            dist.all_gather_object(every, d)
            return {k: v for r in every for k, v in r.items()}

        for name, net, opt in (("B", B, ob), ("C", C, oc)):
            slots = slots_state(net, opt)
            diff: dict = {}  # the copies of each replicated expert against its primary, element-wise
            for li, m in enumerate(net.layers):
                r = replica_router(m)
                for e in range(E):
                    c = r.copies(e)
                    for s in c[1:]:
                        for k, v in slots[f"{li}/{s}"].items():
                            diff[k] = max(diff.get(k, 0.0), float(np.abs(np.subtract(v, slots[f"{li}/{c[0]}"][k])).max()))
            res[f"copies_{name}"] = diff
        dA: dict = {}  # B's primaries and routers against A's experts and routers, on this rank
        for ma, mb in zip(A.layers, B.layers):
            pairs = [("expert", p, q) for j, ex in enumerate(ma.experts.local_experts)
                     for p, q in zip(ex.parameters(), mb.experts.local_experts[j].parameters())]
            pairs += [(f"router_{n}", getattr(ma.router, n), getattr(mb.router, n)) for n in ROUTER_STATE
                      if getattr(ma.router, n, None) is not None]
            for name, p, q in pairs:
                items = [(f"{name}_param", p, q)]
                if isinstance(p, nn.Parameter):
                    items += [(f"{name}_{k}", oa.state[p][k], ob.state[q][k]) for k in ("exp_avg", "exp_avg_sq")]
                for k, x, y in items:
                    dA[k] = max(dA.get(k, 0.0), float((x - y).abs().max()))
        res["diff_A_B"] = dA

        # refusals, on every rank alike and before any communication
        errors = {}

        def refused(key: str, fn: object, *args: object) -> None:
            try:
                fn(*args)
                errors[key] = None
            except InputError as e:
                errors[key] = str(e)

        free = next(x for x in range(E) if x != hot[0])
        refused("again", enable_replicas, B.layers[0], E)
        refused("no_router", replica_router, A.layers[0])
        refused("slots", lambda: enable_replicas(megatron_layer(0, H, S, 3, **LAYERS[0]), S))
        refused("pad", lambda: enable_replicas(megatron_layer(
            0, H, S, 3, moe_router_topk=2, moe_token_dispatcher_type="allgather", moe_expert_capacity_factor=1.0,
            moe_pad_expert_input_to_capacity=True), E))
        refused("held", add_replica, B.layers[0], free, free // L * Ls + free % L, ob)
        refused("not_copy", remove_replica, B.layers[0], free // L * Ls + free % L)
        refused("missing", replica_router(B.layers[0]).set_slots, [-1] * S)
        refused("expert_to_rank", act_mg.expert_to_rank, B.layers[0])
        refused("permute", act_mg.permute_experts, B.layers[0], [0] * E)
        res["errors"] = errors

        # the slot map travels in the layer's state_dict: a fresh replica layer loads it with the tensors
        fresh = megatron_layer(0, H, S, 3, seed=9, **LAYERS[0])
        enable_replicas(fresh, E)
        fresh.load_state_dict(B.layers[0].state_dict())
        with torch.no_grad():
            res["state_dict"] = {"slots": replica_router(fresh).slot_expert, "same_slots": replica_router(fresh).slot_expert
                                 == replica_router(B.layers[0]).slot_expert,
                                 "out_diff": float((fresh(x_fixed)[0] - B.layers[0](x_fixed)[0]).abs().max())}
        parallel_state.destroy_model_parallel()
    write_result(out, res)
    dist.destroy_process_group()


pytest.importorskip("megatron.core")


def _check(out: Path, rs: list[dict], world: int) -> None:
    from moeload import open_trace

    E, S, L, Ls = 2 * world, 3 * world, 2, 3
    busy: dict = {}  # per layer, the routes each copy of its hot expert got, over all ranks and steps
    for r in rs:
        assert r["router_class"] == "ReplicaRouter"
        np.testing.assert_allclose(r["out"][1], r["out"][0], rtol=1e-6)  # the function, with the copies added
        la, lb, lc = (np.array(r["losses"][k]) for k in "ABC")
        np.testing.assert_allclose(lb, la, rtol=1e-6, atol=0)  # replicas leave training unchanged
        np.testing.assert_allclose(lc[:K + 1], la[:K + 1], rtol=1e-6)  # the control: the same until the
        assert np.abs(lc[K + 1:] - la[K + 1:]).max() > 1e-5 * np.abs(la).max()  # first unsynced update, then apart
        assert set(r["copies_B"]) == {"param", "exp_avg", "exp_avg_sq"}
        assert max(r["copies_B"].values()) == 0.0, r["copies_B"]  # copies equal element-wise, moments included
        assert r["copies_C"]["param"] > 1e-6 and r["copies_C"]["exp_avg"] > 1e-6
        assert {"expert_param", "expert_exp_avg", "expert_exp_avg_sq", "router_weight_param",
                "router_weight_exp_avg", "router_bias_exp_avg", "router_expert_bias_param",
                "router_local_tokens_per_expert_param", "router_global_tokens_per_expert_param"} <= set(r["diff_A_B"])
        assert max(r["diff_A_B"].values()) <= 1e-6, r["diff_A_B"]
        for i, layers in enumerate(r["counts"]):
            active = K + i < REMOVE  # layer 1's copy is removed before step REMOVE
            for li, (routed, slot_counts) in enumerate(layers):
                e = r["hot"][li]
                copies = [s for s, x in enumerate(r["slots"][li]) if x == e] if li != 1 \
                    else [e // L * Ls + e % L, (e // L + 1) % world * Ls + L]
                assert len(copies) == (3 if world == 4 and li == 0 else 2)
                got = [slot_counts[s] for s in copies]
                assert sum(got) == routed[e]  # the hot expert's routes, all of them, on its copies
                if li != 1 or active:
                    assert max(got) - min(got) <= 1  # split by position
                    busy[li] = np.add(busy.get(li, 0), got)
                else:
                    assert got[1] == 0  # removed: the copy gets nothing
                # every other logical expert's routes stay on its one (home) slot; free slots get none
                assert [slot_counts[x // L * Ls + x % L] for x in range(E) if x != e] == \
                       [routed[x] for x in range(E) if x != e]
                assert sum(slot_counts) == sum(routed)
        errs = r["errors"]
        assert None not in errs.values(), errs
        assert "already enabled" in errs["again"] and "no replica router" in errs["no_router"]
        assert f"below the layer's {S} slots" in errs["slots"] and "moe_pad_expert_input_to_capacity" in errs["pad"]
        assert "pick a free slot" in errs["held"] and "not a copy" in errs["not_copy"]
        assert "have no slot" in errs["missing"]
        assert "replicas" in errs["expert_to_rank"] and "replicas" in errs["permute"]
        assert r["state_dict"]["same_slots"] and r["state_dict"]["out_diff"] == 0.0
    assert all((v > 0).all() for v in busy.values()) and len(busy) == 3  # every copy did work
    a, b = open_trace(out / "a"), open_trace(out / "b")
    np.testing.assert_array_equal(b.counts(), a.counts())  # the tracer's counts stay per logical expert
    assert (a.counts()[:, 2].sum(-1) < TOKENS * world).any()  # layer 2 dropped routes (kept counts)
    for key in ("layers", "experts_per_layer", "top_k", "ep_size", "expert_to_rank", "count_kind", "tokens_per_step"):
        assert b.meta.get(key) == a.meta.get(key), key  # is A's: EP size from the slots, the logical home map
    np.testing.assert_array_equal(b.gpu_loads(), a.gpu_loads())
    added = rs[0]["added"]
    n = 2 * (2 * H * H)  # one expert's fc1 [2H, H] and fc2 [H, 2H]
    assert all(s["bytes"] == 4 * (3 * n + 2) for s in added)  # params, exp_avg, exp_avg_sq (fp32), 2 steps
    assert all(s["seconds"] > 0 for r in rs for s in r["added"])
    for r in rs:  # synced: one expert per layer, layer 1 off after REMOVE
        assert [s["experts"] for s in r["sync"]] == [0] * K + [3] * (REMOVE - K) + [2] * (STEPS - REMOVE)
        assert r["sync"][-1]["bytes"] == 2 * 4 * n


@pytest.mark.slow
def test_replicas_train_as_the_plain_model_on_two_ranks(tmp_path):
    _check(tmp_path, launch(__file__, tmp_path, nproc=2, timeout=300), world=2)


@pytest.mark.slow
def test_replicas_train_as_the_plain_model_on_four_ranks(tmp_path):
    _check(tmp_path, launch(__file__, tmp_path, nproc=4, timeout=500), world=4)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
