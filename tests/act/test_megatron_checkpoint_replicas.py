"""megatron-core replica layers (moeload.act.megatron_replicas) under the Replacer: a copy of a hot expert in one
layer, two primaries trading ranks in the other, then a checkpoint resumed in a fresh process group. Real
MoELayers (SequentialMLP experts, allgather dispatcher), 2 gloo ranks on CPU, two separate launches.

This file is also the worker. "train": A is the plain model (4 experts; layer 0 top-1 favouring expert 0,
layer 1 top-2 favouring experts 0 and 1, both on rank 0), B the same in 6 slots with replica routers, a
traced LoadTracer, a Replacer checking every 2 steps and `sync_replica_grads` every step. Its plan: layer 0
a copy of expert 0 on rank 1 (COPY), layer 1 the expert->rank map SWAP (experts 1 and 3 trade ranks, each
in its only slot: one goes through the free slot). After step N each rank saves the module's and the
optimizer's state dicts and the tracer's and the Replacer's state; B goes on to STEPS and saves again ("end").
"resume": fresh models from other seeds load the step-N files, a new tracer continues the steps and is told
the slot maps (`record_layout`), a new Replacer gets the saved history, and it trains steps N .. STEPS - 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from _workers import (
    MegatronNet,
    megatron_layer,
    megatron_on_cpu,
    megatron_step,
    megatron_world,
    replica_copy_diff,
    state_diff,
    strip_seconds,
    two_phase_ranks,
    write_result,
)

H, TOKENS, E, S, N, STEPS = 16, 32, 4, 6, 4, 8
BASE = dict(moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none", moe_router_pre_softmax=True)
CONF = ({**BASE, "moe_router_topk": 1}, {**BASE, "moe_router_topk": 2})
INITIAL = [0, 1, -1, 2, 3, -1]
COPY = [0, 1, -1, 2, 3, 0]  # layer 0: a copy of hot expert 0 in rank 1's free slot
SWAP = [0, 1, 1, 0]  # layer 1: experts 1 and 3 trade ranks (an expert->rank map: one copy each)
SWAPPED = [0, 3, -1, 2, 1, -1]
SWAP_OPS = [["add", 1, 2], ["remove", 1], ["add", 3, 1], ["remove", 4], ["add", 1, 4], ["remove", 2]]


def _worker(out: Path, phase: str) -> None:
    import torch

    rank, world = megatron_world()
    from megatron.core import parallel_state

    from moeload import LoadTracer
    from moeload.act.checkpoint import record_layout
    from moeload.act.loop import Replacer
    from moeload.act.megatron_replicas import enable_replicas, replica_router, sync_replica_grads
    from moeload.advise.cost import Calibration

    gen = torch.Generator().manual_seed(1000 + rank)  # different tokens on each rank, the same in both phases
    xs = [torch.randn(TOKENS, 1, H, generator=gen) + 1.0 for _ in range(STEPS)]
    cal = Calibration(tokens=(0.0, 1e4), seconds=(0.0, 1e-2))  # 1 us per route on the busiest GPU

    def replica_net(seed: int, plain: MegatronNet | None) -> MegatronNet:
        """6 slots per layer; with `plain`, its router weights and experts in the home slots."""
        net = MegatronNet(seed, 2, lambda i: megatron_layer(i, H, S, 2, seed=seed, **CONF[i]))
        with torch.no_grad():
            for li, b in enumerate(net.layers):
                w = enable_replicas(b, E).weight
                if plain is not None:
                    w.copy_(plain.layers[li].router.weight)
                    for j, ex in enumerate(plain.layers[li].experts.local_experts):
                        for p, q in zip(ex.parameters(), b.experts.local_experts[j].parameters()):
                            q.copy_(p)
        return net

    def opt(net: MegatronNet) -> torch.optim.Optimizer:
        return torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)

    def ckpt(name: str) -> Path:
        return out / f"{name}_rank{rank}.pt"

    def save(name: str, net: MegatronNet, o: torch.optim.Optimizer, tracer: LoadTracer, rep: Replacer) -> None:
        torch.save({"model": net.state_dict(), "optimizer": o.state_dict(), "tracer": tracer.state_dict(),
                    "replacer": rep.state_dict()}, ckpt(name))

    def slots(net: MegatronNet) -> list:
        return [replica_router(m).slot_expert for m in net.layers]

    def copy_diff(net: MegatronNet, o: torch.optim.Optimizer) -> float:
        return replica_copy_diff([(m.experts.local_experts, replica_router(m).replicated()) for m in net.layers], o)

    def train(net: MegatronNet, o: torch.optim.Optimizer, tracer: LoadTracer, rep: Replacer, t: int) -> float:
        loss = megatron_step(net, o, xs[t], lambda: sync_replica_grads(net))
        tracer.step()
        rep.on_step_end()
        return loss

    res: dict = {"rank": rank}
    with megatron_on_cpu():
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
        if phase == "train":
            A = MegatronNet(0, 2, lambda i: megatron_layer(i, H, E, 2, **CONF[i]))
            with torch.no_grad():  # inputs have mean 1: layer 0 routes to expert 0, layer 1 to experts 0 and 1
                A.layers[0].router.weight[:1] += 0.5
                A.layers[1].router.weight[:1] += 0.5
                A.layers[1].router.weight[1:2] += 0.25
            oa = opt(A)
            B = replica_net(1, A)
            ob = opt(B)
            tracer = LoadTracer(B, out / "trace_b", flush_every=2, fsync=False).start()
            rep = Replacer(tracer, [COPY, SWAP], optimizer=ob, every=2, horizon=4, window=2, calibration=cal)
            la, lb = [], []
            for t in range(STEPS):
                la.append(megatron_step(A, oa, xs[t]))
                lb.append(train(B, ob, tracer, rep, t))
                if tracer.step_count == N:
                    save("ckpt", B, ob, tracer, rep)
                    res["slots_saved"], res["copy_diff_saved"] = slots(B), copy_diff(B, ob)
            save("end", B, ob, tracer, rep)
            tracer.close()
            res.update(losses={"A": la, "B": lb}, history=rep.history, slots=slots(B), copy_diff=copy_diff(B, ob))
        else:
            ck, end = torch.load(ckpt("ckpt"), weights_only=False), torch.load(ckpt("end"), weights_only=False)
            R = replica_net(5, None)
            orr = opt(R)
            res["slots_fresh"] = slots(R)
            R.load_state_dict(ck["model"])  # installs the slot maps (the routers' extra state) with the slots
            orr.load_state_dict(ck["optimizer"])
            res["slots_loaded"], res["copy_diff_loaded"] = slots(R), copy_diff(R, orr)
            res["diff_loaded"] = state_diff(R, orr, ck)
            tracer = LoadTracer(R, out / "trace_r", flush_every=2, fsync=False)
            tracer.load_state_dict(ck["tracer"])
            tracer.start()
            res["recorded"] = record_layout(tracer, R)
            rep = Replacer(tracer, [COPY, SWAP], optimizer=orr, every=2, horizon=4, window=2, calibration=cal)
            rep.load_state_dict(ck["replacer"])
            res["losses"] = [train(R, orr, tracer, rep, t) for t in range(N, STEPS)]
            tracer.close()
            res.update(history=rep.history, slots=slots(R), copy_diff=copy_diff(R, orr),
                       diff_end=state_diff(R, orr, end))
    write_result(out, res, prefix=f"{phase}_")


pytest.importorskip("megatron.core")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    return two_phase_ranks(__file__, tmp_path_factory.mktemp("megatron_ckpt_replicas"))


@pytest.mark.slow
def test_a_copy_and_two_primaries_trading_ranks_leave_training_unchanged(ranks):
    for tr in ranks["train"]:
        h = tr["history"]
        assert [d["step"] for d in h] == [2, 4, 6, 8]
        assert h[0]["apply"] == {"0": COPY, "1": SWAPPED}
        v = h[0]["layers"]["1"]  # expert 1 through free slot 2 (a local copy), expert 3 to rank 0, 1 to rank 1
        assert v["ops"] == SWAP_OPS and v["experts_moved"] == 3 and v["gain_s"] > v["cost_s"] > 0
        assert h[0]["layers"]["0"]["ops"] == [["add", 0, 5]]
        assert all(d["apply"] == {} and d["why"] == "the plan is the map in force" for d in h[1:])
        assert tr["slots_saved"] == tr["slots"] == [COPY, SWAPPED]
        # the plain model's losses; expert 0's copies are identical (parameters, exp_avg, exp_avg_sq)
        np.testing.assert_allclose(tr["losses"]["B"], tr["losses"]["A"], rtol=1e-6, atol=0)
        assert tr["copy_diff_saved"] == tr["copy_diff"] == 0.0


@pytest.mark.slow
def test_a_run_resumed_in_a_fresh_process_group_continues_the_uninterrupted_one(ranks):
    for tr, rs in zip(ranks["train"], ranks["resume"]):
        assert rs["slots_fresh"] == [INITIAL] * 2
        assert rs["slots_loaded"] == [COPY, SWAPPED] and rs["copy_diff_loaded"] == 0.0
        assert {"model", "exp_avg", "exp_avg_sq", "step"} <= set(rs["diff_loaded"])
        assert max(rs["diff_loaded"].values()) == 0.0
        np.testing.assert_allclose(rs["losses"], tr["losses"]["B"][N:], rtol=1e-6, atol=0)
        np.testing.assert_allclose(rs["losses"], tr["losses"]["A"][N:], rtol=1e-6, atol=0)
        assert strip_seconds(rs["history"]) == strip_seconds(tr["history"]) and rs["slots"] == tr["slots"]
        assert rs["copy_diff"] == 0.0
        assert max(rs["diff_end"].values()) <= 1e-6, rs["diff_end"]


@pytest.mark.slow
def test_the_resumed_trace_is_told_the_slot_maps(ranks):
    from moeload import open_trace
    from moeload.act.slot_plan import replica_gpu_loads

    out = ranks["out"]
    assert ranks["resume"][0]["recorded"] == ["layers.0.router", "layers.1.router"]
    b, r = open_trace(out / "trace_b"), open_trace(out / "trace_r")
    assert r.steps.tolist() == list(range(N, STEPS))
    np.testing.assert_array_equal(r.counts(), b.counts()[N:])
    assert b.meta["extra"]["replica_slot_changes"] == [{"step": 2, "layer": 0, "slot_expert": COPY},
                                                       {"step": 2, "layer": 1, "slot_expert": SWAPPED}]
    assert r.meta["extra"]["replica_slot_changes"] == [{"step": N, "layer": 0, "slot_expert": COPY},
                                                       {"step": N, "layer": 1, "slot_expert": SWAPPED}]
    assert r.meta["rank_map_changes"] == [{"step": N, "layer": 0, "expert_to_rank": [0, 0, 1, 1]},
                                          {"step": N, "layer": 1, "expert_to_rank": SWAP}]
    np.testing.assert_array_equal(r.gpu_loads(), b.gpu_loads()[N:])
    np.testing.assert_array_equal(replica_gpu_loads(r), replica_gpu_loads(b)[N:])
    c = r.counts()  # layer 1 swapped: experts 0 and 3 on rank 0, 1 and 2 on rank 1
    np.testing.assert_array_equal(r.gpu_loads()[:, 1], np.stack([c[:, 1, [0, 3]].sum(-1), c[:, 1, 1:3].sum(-1)], -1))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
