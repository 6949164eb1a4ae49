"""Expert replicas (moeload.act.replicas) on real DeepSpeed MoE layers, gloo processes on CPU: 2 ranks
(4 logical experts in 6 slots) and 4 ranks (8 experts in 12 slots); one free slot per rank.

This file is also the worker: pytest runs it under `torch.distributed.run` (_workers.launch); each rank
writes what it measured to rank<r>.json. Three runs from the same weights and inputs, each traced by a
LoadTracer: A is the plain model (E experts); B has E + world slots with replica gates, and from step 2
each layer's busiest expert (counted over all ranks) gets a copy on the next rank (on 4 ranks, layer 0's
gets a second copy two ranks on), its gradients summed by sync_replica_grads; after step 4 layer 1's
copy is removed. C is B without sync_replica_grads (the control: its copies part and its losses leave A's).
Layer 0 is top-1, layer 1 top-2, both drop_tokens=False; layer 2 top-1 with capacity factor 1, so it drops.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from _workers import DeepSpeedNet, deepspeed_engine, deepspeed_world, launch, write_result

H, TOKENS, STEPS, K, REMOVE = 16, 32, 7, 2, 4
LAYERS = ((1, False), (2, False), (1, True))


def _worker(out: Path) -> None:
    import torch
    import torch.distributed as dist

    rank, world = deepspeed_world()
    from moeload import LoadTracer
    from moeload.act.replicas import add_replica, enable_replicas, remove_replica, replica_gate, sync_replica_grads

    E, S = 2 * world, 3 * world
    L, Ls = 2, 3
    torch.manual_seed(0)
    A = deepspeed_engine(DeepSpeedNet(H, E, world, LAYERS))

    def replica_engine() -> object:
        torch.manual_seed(1)
        net = DeepSpeedNet(H, S, world, LAYERS)
        with torch.no_grad():
            for a, b in zip(A.module.moe, net.moe):
                enable_replicas(b, E).wg.weight.copy_(a.deepspeed_moe.gate.wg.weight)
                for j, ex in enumerate(a.deepspeed_moe.experts.deepspeed_experts):  # logical rank * L + j
                    for p, q in zip(ex.parameters(), b.deepspeed_moe.experts.deepspeed_experts[j].parameters()):
                        q.copy_(p)
        return deepspeed_engine(net)

    B, C = replica_engine(), replica_engine()
    gen = torch.Generator().manual_seed(1000 + rank)
    xs = [torch.randn(1, TOKENS, H, generator=gen) for _ in range(STEPS)]

    def step(eng: object, t: int, sync: bool) -> float:
        loss = eng(xs[t])
        eng.backward(loss)
        if sync:
            res.setdefault("sync", []).append(sync_replica_grads(eng))
        eng.step()
        return float(loss.detach())

    res: dict = {"rank": rank}
    tracers = {n: LoadTracer(e.module, out / n, flush_every=2, fsync=False).start() for n, e in zip("ab", (A, B))}
    losses: dict = {"A": [], "B": [], "C": []}
    hot: list = []
    counts: list = []  # per step >= K, per layer of B: (logical exp_counts [E], slot_counts [S])
    for t in range(STEPS):
        if t == K:
            for li, (mb, mc) in enumerate(zip(B.module.moe, C.module.moe)):
                routed = mb.deepspeed_moe.exp_counts.clone()
                dist.all_reduce(routed)  # the last step's routes per logical expert, all ranks
                e = int(routed.argmax())
                dsts = [(e // L + 1) % world] + ([(e // L + 2) % world] if world == 4 and li == 0 else [])
                for d in dsts:
                    res.setdefault("added", []).append(add_replica(mb, e, d * Ls + L, B))
                    add_replica(mc, e, d * Ls + L, C)
                hot.append(e)
        if t == REMOVE:
            slot = (hot[1] // L + 1) % world * Ls + L  # the copy added at step K
            remove_replica(B.module.moe[1], slot)
            remove_replica(C.module.moe[1], slot)
        losses["A"].append(step(A, t, False))
        losses["B"].append(step(B, t, True))
        losses["C"].append(step(C, t, False))
        if t >= K:
            counts.append([(m.deepspeed_moe.exp_counts.tolist(), m.deepspeed_moe.gate.slot_counts.tolist())
                           for m in B.module.moe])
        for tr in tracers.values():
            tr.step()
    for tr in tracers.values():
        tr.close()
    res.update(losses=losses, hot=hot, counts=counts, slots=[replica_gate(m).slot_expert for m in B.module.moe])

    def state(eng: object) -> dict:
        """This rank's expert slots: {"layer/slot": {"param"|"exp_avg"|"exp_avg_sq": flat list}}."""
        opt, d = eng.optimizer, {}
        for li, m in enumerate(eng.module.moe):
            for j, ex in enumerate(m.deepspeed_moe.experts.deepspeed_experts):
                ps = list(ex.parameters())
                d[f"{li}/{rank * Ls + j}"] = {"param": torch.cat([p.detach().reshape(-1) for p in ps]).tolist(),
                                              **{k: torch.cat([opt.state[p][k].reshape(-1) for p in ps]).tolist()
                                                 for k in ("exp_avg", "exp_avg_sq")}}
        return d

    for name, eng in (("B", B), ("C", C)):
        every: list = [None] * world
        dist.all_gather_object(every, state(eng))
        slots = {k: v for r in every for k, v in r.items()}
        # the copies of each replicated expert against its primary, element-wise
        diff: dict = {}
        for li, m in enumerate(eng.module.moe):
            gate = replica_gate(m)
            for e in range(E):
                c = gate.copies(e)
                for s in c[1:]:
                    for k, v in slots[f"{li}/{s}"].items():
                        diff[k] = max(diff.get(k, 0.0), float(np.abs(np.subtract(v, slots[f"{li}/{c[0]}"][k])).max()))
        res[f"copies_{name}"] = diff
    # B's primaries (and gates) against A's experts, on this rank
    dA: dict = {}
    for ma, mb in zip(A.module.moe, B.module.moe):
        pairs = [(p, q) for j, ex in enumerate(ma.deepspeed_moe.experts.deepspeed_experts)
                 for p, q in zip(ex.parameters(), mb.deepspeed_moe.experts.deepspeed_experts[j].parameters())]
        pairs.append((ma.deepspeed_moe.gate.wg.weight, mb.deepspeed_moe.gate.wg.weight))
        for p, q in pairs:
            for k, x, y in [("param", p, q)] + [(k, A.optimizer.state[p][k], B.optimizer.state[q][k])
                                                 for k in ("exp_avg", "exp_avg_sq")]:
                dA[k] = max(dA.get(k, 0.0), float((x - y).abs().max()))
    res["diff_A_B"] = dA
    write_result(out, res)
    dist.barrier()
    dist.destroy_process_group()


pytest.importorskip("deepspeed")


def _check(out: Path, rs: list[dict], world: int) -> None:
    from moeload import open_trace

    E, Ls = 2 * world, 3
    busy: dict = {}  # per layer, the tokens each copy of its hot expert got, over all ranks and steps
    for r in rs:
        la, lb, lc = (np.array(r["losses"][k]) for k in "ABC")
        np.testing.assert_allclose(lb, la, rtol=1e-6, atol=0)  # replicas leave training unchanged
        np.testing.assert_allclose(lc[:K + 1], la[:K + 1], rtol=1e-6)  # the control: the same until the
        assert np.abs(lc[K + 1:] - la[K + 1:]).max() > 1e-5 * np.abs(la).max()  # first unsynced update, then apart
        assert max(r["copies_B"].values()) == 0.0, r["copies_B"]  # copies equal element-wise, moments included
        assert set(r["copies_B"]) == {"param", "exp_avg", "exp_avg_sq"}
        assert r["copies_C"]["param"] > 1e-6 and r["copies_C"]["exp_avg"] > 1e-6
        assert max(r["diff_A_B"].values()) <= 1e-6, r["diff_A_B"]
        for i, layers in enumerate(r["counts"]):
            active = K + i < REMOVE  # layer 1's copy is removed before step REMOVE
            for li, (routed, slot_counts) in enumerate(layers):
                e = r["hot"][li]
                copies = [s for s, x in enumerate(r["slots"][li]) if x == e] if li != 1 \
                    else [e // 2 * Ls + e % 2, (e // 2 + 1) % world * Ls + 2]
                assert len(copies) == (3 if world == 4 and li == 0 else 2)
                got = [slot_counts[s] for s in copies]
                if li != 1 or active:
                    assert max(got) - min(got) <= 1  # split by position
                    busy[li] = np.add(busy.get(li, 0), got)
                else:
                    assert got[1] == 0  # removed: the copy gets nothing
                if not LAYERS[li][1]:
                    assert sum(got) == routed[e]
                    # every other logical expert's tokens stay on its one slot
                    assert [slot_counts[x // 2 * Ls + x % 2] for x in range(E) if x != e] == \
                           [routed[x] for x in range(E) if x != e]
                else:
                    assert sum(got) <= routed[e]
    assert all((v > 0).all() for v in busy.values()) and len(busy) == 3  # every copy did work
    a, b = open_trace(out / "a"), open_trace(out / "b")
    np.testing.assert_array_equal(b.counts(), a.counts())  # the tracer's counts stay per logical expert
    # kept counts too, in the layer that drops (the adapter reads slot ids through the gate's slot_logical)
    np.testing.assert_array_equal(b.counts(kind="kept"), a.counts(kind="kept"))
    assert (a.counts(kind="kept")[:, 2] < a.counts()[:, 2]).any()  # layer 2 did drop routes
    added = rs[0]["added"]
    n = (H * 2 * H + 2 * H) + (2 * H * H + H)  # one expert's parameters
    assert all(s["bytes"] == 4 * (3 * n + 4) for s in added)  # params, exp_avg, exp_avg_sq (fp32), 4 steps
    assert all(s["seconds"] > 0 for r in rs for s in r["added"])
    for r in rs:  # synced: one expert per layer (layer 0 with two copies on 4 ranks), layer 1 off after REMOVE
        assert [s["experts"] for s in r["sync"]] == [0] * K + [3] * (REMOVE - K) + [2] * (STEPS - REMOVE)
        assert r["sync"][-1]["bytes"] == 2 * 4 * n


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("replicas2")
    return out, launch(__file__, out, nproc=2)


@pytest.mark.slow
def test_replicas_train_as_the_plain_model_on_two_ranks(two_ranks):
    _check(*two_ranks, world=2)


@pytest.mark.slow
def test_replicas_train_as_the_plain_model_on_four_ranks(tmp_path):
    _check(tmp_path, launch(__file__, tmp_path, nproc=4, timeout=300), world=4)


def test_enable_replicas_refuses_bad_arguments():
    import torch
    from deepspeed.moe.layer import MoE

    from moeload.act.replicas import enable_replicas, remove_replica, replica_gate
    from moeload.errors import InputError

    moe = MoE(8, torch.nn.Linear(8, 8), num_experts=6, ep_size=1, k=1)
    with pytest.raises(InputError, match="no replica gate"):
        replica_gate(moe)
    with pytest.raises(InputError, match="below the layer's 6 slots"):
        enable_replicas(moe, 6)
    gate = enable_replicas(moe, 4)
    assert gate.wg.weight.shape == (4, 8) and gate.slot_expert == [0, 1, 2, 3, -1, -1]
    with pytest.raises(InputError, match="already enabled"):
        enable_replicas(moe, 4)
    with pytest.raises(InputError, match=r"experts \[3\] have no slot"):
        gate.set_slots([0, 1, 2, -1, -1, -1])
    with pytest.raises(InputError, match="not a copy"):
        remove_replica(moe, 0)


def test_one_process_layer_dense_gate_form_and_state_dict():
    """ep_size 1, no process group: a replica layer computes the plain layer's output (top-2 with drops); the
    gate's dense form (TopKGate called on its own) gives each logical expert the plain gate's weights; the
    slot map is saved in the state_dict and loaded from it."""
    import torch
    from deepspeed.moe.layer import MoE

    from moeload.act.replicas import add_replica, enable_replicas

    torch.manual_seed(0)
    h = 8
    ex = torch.nn.Sequential(torch.nn.Linear(h, 2 * h), torch.nn.GELU(), torch.nn.Linear(2 * h, h))
    kw = {"ep_size": 1, "k": 2, "min_capacity": 1, "use_rts": False, "top2_2nd_expert_sampling": False}
    plain, rep = MoE(h, ex, num_experts=4, **kw), MoE(h, ex, num_experts=6, **kw)
    gate = enable_replicas(rep, 4)
    with torch.no_grad():
        gate.wg.weight.copy_(plain.deepspeed_moe.gate.wg.weight)
        for a, b in zip(plain.deepspeed_moe.experts.deepspeed_experts, rep.deepspeed_moe.experts.deepspeed_experts):
            for p, q in zip(a.parameters(), b.parameters()):
                q.copy_(p)
    stats = add_replica(rep, 1, 4)
    assert stats["src_slot"] == 1 and gate.slot_expert == [0, 1, 2, 3, 1, -1] and gate.copies(1) == [1, 4]
    x = torch.randn(1, 40, h)
    y_plain, y_rep = plain(x)[0], rep(x)[0]
    routed = plain.deepspeed_moe.exp_counts
    assert (routed > 20).any()  # capacity 2 x 40 / 4 = 20: some routes drop
    torch.testing.assert_close(y_rep, y_plain, rtol=1e-6, atol=1e-7)
    assert torch.equal(rep.deepspeed_moe.exp_counts, routed)  # logical counts
    c = gate.slot_counts.tolist()
    assert c[5] == 0 and abs(c[1] - c[4]) <= 1 and c[1] + c[4] == min(int(routed[1]), 20)
    combine, dispatch, combine_rep = (plain.deepspeed_moe.gate(x[0])[1], gate(x[0])[2], gate(x[0])[1])
    assert combine_rep.shape == (40, 6, max(c)) and torch.equal(dispatch.sum((0, 2)), gate.slot_counts)
    by_expert = torch.stack([combine_rep[:, [s for s, e in enumerate(gate.slot_expert) if e == le]].sum((1, 2))
                             for le in range(4)], 1)
    torch.testing.assert_close(by_expert, combine.sum(-1), rtol=0, atol=0)
    # the slot map travels in the layer's state_dict: a fresh replica layer loads it with the tensors
    fresh = MoE(h, ex, num_experts=6, **kw)
    enable_replicas(fresh, 4)
    fresh.load_state_dict(rep.state_dict())
    assert fresh.deepspeed_moe.gate.slot_expert == [0, 1, 2, 3, 1, -1]
    torch.testing.assert_close(fresh(x)[0], y_rep, rtol=0, atol=0)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))


def test_permutation_refuses_a_replica_layer():
    """permute_experts / expert_to_rank (and so apply_layout and the Replacer) assume one slot per expert."""
    pytest.importorskip("deepspeed")
    import torch

    from moeload.act import deepspeed as act_ds
    from moeload.act.replicas import ReplicaGate
    from moeload.errors import InputError

    class Layer:  # the attributes act.deepspeed reads, around a real ReplicaGate
        pass

    from deepspeed.moe.sharded_moe import TopKGate

    layer = Layer()
    layer.gate = ReplicaGate(TopKGate(8, 4, k=1), 4, [0, 1, 2, 3, 0, -1], ep_size=1)
    layer.experts = type("E", (), {"deepspeed_experts": torch.nn.ModuleList()})()
    with pytest.raises(InputError, match="replicas"):
        act_ds.expert_to_rank(layer)
    with pytest.raises(InputError, match="replicas"):
        act_ds.permute_experts(layer, [0, 0, 0, 0])
