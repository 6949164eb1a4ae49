"""The loop (moeload.act.loop.Replacer) driving megatron-core replica layers (moeload.act.megatron_replicas)
on real MoELayers (SequentialMLP experts, allgather dispatcher) over 2 gloo ranks, with a real LoadTracer.

This file is also the worker: pytest runs it under `torch.distributed.run` (_workers.launch). A is the plain
model (4 experts), B has 6 slots (one free per rank) with replica routers and a Replacer checking every 2 steps,
its plan a copy of hot expert 0 on rank 1; `sync_replica_grads` every step. The router favours expert 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from _workers import (
    LOOP_STEPS,
    MegatronNet,
    launch,
    megatron_layer,
    megatron_on_cpu,
    megatron_step,
    megatron_world,
    write_result,
)

H, TOKENS, E, S = 16, 32, 4, 6
CONF = dict(moe_router_topk=1, moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
            moe_router_pre_softmax=True)
PLAN = [0, 1, -1, 2, 3, 0]  # a copy of hot expert 0 in rank 1's free slot


def _worker(out: Path) -> None:
    import torch
    import torch.distributed as dist

    rank, world = megatron_world()
    from megatron.core import parallel_state

    from moeload import LoadTracer
    from moeload.act.loop import Replacer
    from moeload.act.megatron_replicas import enable_replicas, replica_router, sync_replica_grads
    from moeload.advise.cost import Calibration

    res: dict = {"rank": rank}
    with megatron_on_cpu():
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
        A = MegatronNet(0, 1, lambda i: megatron_layer(i, H, E, 1, **CONF))
        with torch.no_grad():
            A.layers[0].router.weight[:1] += 0.5
        oa = torch.optim.AdamW(A.parameters(), lr=1e-2, weight_decay=0.1)
        B = MegatronNet(1, 1, lambda i: megatron_layer(i, H, S, 1, seed=7, **CONF))
        with torch.no_grad():
            for a, b in zip(A.layers, B.layers):
                enable_replicas(b, E).weight.copy_(a.router.weight)
                for j, ex in enumerate(a.experts.local_experts):
                    for p, q in zip(ex.parameters(), b.experts.local_experts[j].parameters()):
                        q.copy_(p)
        ob = torch.optim.AdamW(B.parameters(), lr=1e-2, weight_decay=0.1)
        gen = torch.Generator().manual_seed(1000 + rank)
        xs = [torch.randn(TOKENS, 1, H, generator=gen) + 1.0 for _ in range(LOOP_STEPS)]
        cal = Calibration(tokens=(0.0, 1e4), seconds=(0.0, 1e-2))
        ta = LoadTracer(A, out / "a", flush_every=2, fsync=False).start()
        tb = LoadTracer(B, out / "b", flush_every=2, fsync=False).start()
        rep = Replacer(tb, [PLAN], optimizer=ob, every=2, horizon=4, window=2, calibration=cal)
        la, lb = [], []
        for t in range(LOOP_STEPS):
            la.append(megatron_step(A, oa, xs[t]))
            lb.append(megatron_step(B, ob, xs[t], lambda: sync_replica_grads(B)))
            ta.step()
            tb.step()
            rep.on_step_end()
        ta.close()
        tb.close()
        r = replica_router(B.layers[0])
        mine = {rank * 3 + j: torch.cat([p.detach().reshape(-1) for p in ex.parameters()]).tolist()
                for j, ex in enumerate(B.layers[0].experts.local_experts)}
        every: list = [None] * world
        dist.all_gather_object(every, mine)
        flat = {k: v for d in every for k, v in d.items()}
        c = r.copies(0)
        res.update(losses={"A": la, "B": lb}, history=rep.history, slots=r.slot_expert,
                   copy_diff=float(np.abs(np.subtract(flat[c[0]], flat[c[-1]])).max()), copies=c)
    write_result(out, res)


pytest.importorskip("megatron.core")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("megatron_loop_replicas")
    return out, launch(__file__, out)


@pytest.mark.slow
def test_replacer_adds_a_copy_on_megatron_and_training_is_unchanged(ranks):
    from moeload import open_trace
    from moeload.act.slot_plan import replica_gpu_loads

    out, rs = ranks
    for r in rs:
        applied = [d for d in r["history"] if d["apply"]]
        assert applied and applied[0]["apply"] == {"0": PLAN}
        assert r["slots"] == PLAN and len(r["copies"]) == 2
        np.testing.assert_allclose(r["losses"]["B"], r["losses"]["A"], rtol=1e-6, atol=0)
        assert r["copy_diff"] == 0.0
    b = open_trace(out / "b")
    step = applied[0]["step"]
    assert b.meta["extra"]["replica_slot_changes"] == [{"step": step, "layer": 0, "slot_expert": PLAN}]
    c = b.counts()
    gr = replica_gpu_loads(b)
    np.testing.assert_array_equal(gr.sum(-1), c.sum(-1))
    n0 = c[step:, :, 0]
    want = np.stack([n0 - n0 // 2 + c[step:, :, 1], n0 // 2 + c[step:, :, 2] + c[step:, :, 3]], -1)
    np.testing.assert_array_equal(gr[step:], want)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
