"""The loop (moeload.act.loop.Replacer) driving replica layers (moeload.act.replicas.ReplicaGate) of a real
DeepSpeed MoE model over 2 gloo ranks, with a real LoadTracer.

This file is also the worker: pytest runs it under `torch.distributed.run` (_workers.launch); each rank writes
what it saw to rank<r>.json. Runs from the same weights and inputs: A is the plain model (4 experts, contiguous),
traced; B has 6 slots (4 experts, one free slot per rank) with replica gates, traced, a Replacer checking every
2 steps and `sync_replica_grads` every step; C is B without `sync_replica_grads` (the control). The gates favour
expert 0. At step 2 the plan copies cold expert 3 onto the hot rank (no gain: not applied); then it is an EPLB
placement of 6 slots for loads [10, 1, 1, 1] (expert 0 in three slots, experts 1 and 3 change ranks), applied at
step 4 as add / remove calls; at step 6 the plan is the map in force; then a plan that would need a spare slot
is refused on every rank with one warning, and nothing moves.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from _workers import (
    LOOP_STEPS,
    DeepSpeedNet,
    deepspeed_engine,
    deepspeed_world,
    launch,
    replica_copy_diff,
    write_result,
)

H, TOKENS, E, S = 16, 32, 4, 6
LAYERS = ((1, False), (2, False))
COLD = [0, 1, 3, 2, 3, -1]  # a copy of cold expert 3 on rank 0, which is already the busy one
TARGET = [0, 0, 3, 2, 0, 1]  # the EPLB plan's slot map, kept where the slots already hold what a rank needs
OPS = [["add", 3, 2], ["add", 1, 5], ["remove", 1], ["remove", 4], ["add", 0, 1], ["add", 0, 4]]
PRIMARY = [0, 1, 1, 0]  # each expert's primary rank after the change (what rank_map_changes holds)
STUCK = [0, 0, 1, 2, 0, 3]  # swaps experts 1 and 3, each in its only slot, with no slot free


def _worker(out: Path) -> None:
    import warnings

    import torch

    rank, world = deepspeed_world()
    from moeload import LoadTracer, placement
    from moeload.act.loop import Replacer
    from moeload.act.replicas import enable_replicas, replica_gate, sync_replica_grads
    from moeload.advise.cost import Calibration

    torch.manual_seed(0)
    plain = DeepSpeedNet(H, E, world, LAYERS)
    with torch.no_grad():
        for m in plain.moe:  # inputs have mean 1, so expert 0 takes nearly every first choice
            m.deepspeed_moe.gate.wg.weight[:1] += 0.5
    A = deepspeed_engine(plain)

    def replica_engine() -> object:
        torch.manual_seed(1)
        net = DeepSpeedNet(H, S, world, LAYERS)
        with torch.no_grad():
            for a, b in zip(A.module.moe, net.moe):
                enable_replicas(b, E).wg.weight.copy_(a.deepspeed_moe.gate.wg.weight)
                for j, ex in enumerate(a.deepspeed_moe.experts.deepspeed_experts):  # expert rank * 2 + j in slot j
                    for p, q in zip(ex.parameters(), b.deepspeed_moe.experts.deepspeed_experts[j].parameters()):
                        q.copy_(p)
        return deepspeed_engine(net)

    B, C = replica_engine(), replica_engine()
    gen = torch.Generator().manual_seed(1000 + rank)
    xs = [torch.randn(1, TOKENS, H, generator=gen) + 1.0 for _ in range(LOOP_STEPS)]
    eplb = placement.plan(np.array([[10.0, 1, 1, 1]] * 2), num_gpus=world, num_replicas=S, policy="eplb")
    cal = Calibration(tokens=(0.0, 1e4), seconds=(0.0, 1e-2))  # 1 us per route on the busiest GPU

    def run(name: str, eng: object, sync: bool | None) -> dict:
        """sync None: no Replacer (A); else the Replacer, with or without sync_replica_grads."""
        tracer = LoadTracer(eng.module, out / name, flush_every=2, fsync=False)
        rep = None
        if sync is not None:
            rep = Replacer(tracer, [COLD, COLD], optimizer=eng, every=2, horizon=4, window=2, calibration=cal)
        losses, slot_counts, synced = [], [], []
        with tracer:
            for t in range(LOOP_STEPS):
                loss = eng(xs[t])
                eng.backward(loss)
                if sync:
                    synced.append(sync_replica_grads(eng)["experts"])
                eng.step()
                losses.append(float(loss.detach()))
                if sync is not None:
                    slot_counts.append([m.deepspeed_moe.gate.slot_counts.tolist() for m in eng.module.moe])
                tracer.step()
                if rep is not None:
                    rep.on_step_end()
                    if tracer.step_count == 2:
                        rep.set_plan(eplb)
            caught: list = []
            if rep is not None:
                rep.set_plan([STUCK, STUCK])
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    rep.check()
        res = {"losses": losses, "slot_counts": slot_counts, "synced": synced,
               "history": [] if rep is None else rep.history, "warned": [str(w.message) for w in caught]}
        if sync is not None:
            res["slots"] = [replica_gate(m).slot_expert for m in eng.module.moe]
            res["copy_diff"] = replica_copy_diff([(m.deepspeed_moe.experts.deepspeed_experts, replica_gate(m).replicated())
                                                  for m in eng.module.moe], eng.optimizer)
        return res

    write_result(out, {"A": run("a", A, None), "B": run("b", B, True), "C": run("c", C, False), "rank": rank})


pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("loop_replicas")
    return out, launch(__file__, out)


@pytest.mark.slow
def test_replacer_adds_copies_when_they_pay_and_training_is_unchanged(ranks):
    rs = ranks[1]
    for r in rs:
        h = r["B"]["history"]
        assert [d["step"] for d in h] == [2, 4, 6, 8, 8]
        # step 2: a copy of a cold expert on the busy rank makes it busier: not applied
        assert h[0]["apply"] == {} and set(h[0]["layers"]) == {"0", "1"}
        assert all(v["gain_s"] <= v["cost_s"] and v["ops"] == [["add", 3, 2]] for v in h[0]["layers"].values())
        # step 4: the EPLB plan, as add / remove calls; each add copies one expert with its Adam state
        assert h[1]["apply"] == {"0": TARGET, "1": TARGET}
        for v in h[1]["layers"].values():
            assert v["ops"] == OPS and v["experts_moved"] == 4
            assert v["gain_s"] > v["cost_s"] > 0 and v["after_s"] < v["before_s"]
            assert v["bytes_total"] > 4 * 3 * 4 * (16 * 32 * 2) and v["seconds"] > 0  # params + 2 moments, fp32
        assert all(d["apply"] == {} and d["why"] == "the plan is the map in force" for d in h[2:4])
        assert "only copy" in h[4]["error"] and h[4]["apply"] == {}
        assert len(r["B"]["warned"]) == 1 and "re-placement check at step 8 failed on rank 0" in r["B"]["warned"][0]
        assert r["B"]["slots"] == [TARGET, TARGET]
        # B syncs nothing before the change, both layers' expert 0 after it
        assert r["B"]["synced"] == [0] * 4 + [2] * 4
        # copies transparent: the plain model's losses; copies identical element-wise (params, exp_avg, exp_avg_sq)
        np.testing.assert_allclose(r["B"]["losses"], r["A"]["losses"], rtol=1e-6, atol=0)
        assert r["B"]["copy_diff"] == 0.0
        # control: without sync_replica_grads the copies part after the first update with them, and the losses leave A's
        assert r["C"]["copy_diff"] > 1e-6
        rel = np.abs(np.subtract(r["C"]["losses"], r["A"]["losses"])) / np.abs(r["A"]["losses"])
        assert rel[:5].max() <= 1e-6 < rel[5:].max()
    strip = [[{**d, "layers": {k: {n: x for n, x in v.items() if n != "seconds"} for k, v in d["layers"].items()}}
              for d in r["B"]["history"]] for r in rs]
    assert strip[0] == strip[1]  # one decision (rank 0's, broadcast)


@pytest.mark.slow
def test_the_trace_records_primaries_and_slot_maps_and_the_split_loads(ranks):
    from moeload import open_trace
    from moeload.act.slot_plan import replica_gpu_loads

    out, rs = ranks
    a, b = open_trace(out / "a"), open_trace(out / "b")
    c = b.counts()
    np.testing.assert_array_equal(c, a.counts())  # counts stay per logical expert across the change
    assert (c[:, 0, 0] == c[:, 0].sum(-1)).all()  # layer 0 (top-1): expert 0 takes every route (layer 1 learns away)
    # what fits in rank_map_changes: each expert's primary rank; the slot maps go into the manifest's extra
    assert b.meta["rank_map_changes"] == [{"step": 4, "layer": li, "expert_to_rank": PRIMARY} for li in (0, 1)]
    assert b.meta["extra"]["replica_slot_changes"] == [{"step": 4, "layer": li, "slot_expert": TARGET} for li in (0, 1)]
    ga, gb = a.gpu_loads(), b.gpu_loads()
    np.testing.assert_array_equal(gb[:4], ga[:4])
    prim = np.asarray(PRIMARY)
    np.testing.assert_array_equal(gb[4:], np.stack([c[4:, :, prim == g].sum(-1) for g in (0, 1)], -1))
    # replica_gpu_loads splits expert 0's routes over its three copies (two on rank 0, one on rank 1)
    gr = replica_gpu_loads(b)
    np.testing.assert_array_equal(gr[:4], ga[:4])
    n0 = c[4:, :, 0]
    want = np.stack([n0 - n0 // 3 + c[4:, :, 3], n0 // 3 + c[4:, :, 1] + c[4:, :, 2]], -1)  # copy 3 of 3 gets n // 3
    np.testing.assert_array_equal(gr[4:], want)
    # against the gates' real split: slot counts of both ranks, per rank's slots (3 each); within one per copy and rank
    real = np.sum([r["B"]["slot_counts"] for r in rs], axis=0).reshape(len(c), 2, 2, 3).sum(-1)  # [S, L, G]
    np.testing.assert_array_equal(real.sum(-1), gr.sum(-1))
    assert np.abs(real[4:] - gr[4:]).max() <= 3 * len(rs)
    assert (gr[4:, 0].max(-1) < ga[4:, 0].max(-1)).all()  # layer 0: the busiest GPU got lighter


def test_slot_plans_and_refusals():
    from moeload.act import slot_plan as sp
    from moeload.errors import InputError

    cur = [0, 1, -1, 2, 3, -1]
    t = sp.slot_target(sp.per_rank([0, 0, 3, 0, 1, 2], E, S, 2, "p"), cur)
    assert t == TARGET and sp.slot_moves(cur, t) == [tuple(o) for o in OPS]
    assert sp.primary_ranks(t, E, 2) == PRIMARY
    # an [E] map: one copy each; copies in the way are removed
    assert sp.slot_target(sp.per_rank([0, 0, 1, 1], E, S, 2, "p"), TARGET) == [0, 1, -1, 2, 3, -1]
    assert sp.slot_moves(TARGET, [0, 1, -1, 2, 3, -1])[0][0] == "remove"
    p2l, share = sp.cost_arrays(TARGET)
    assert p2l.tolist() == TARGET and np.allclose(share, [1 / 3, 1 / 3, 1, 1, 1 / 3, 1])
    for bad, msg in (([0, 1, 2, 2, 1, -1], "experts [3] have no slot"), ([0, 1, 5, 2, 3, -1], "slots must hold"),
                     ([0, 0, 0, 0], "rank 0 would hold 4"), ([0, 1, 2], "expected 6 slots")):
        with pytest.raises(InputError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            sp.per_rank(bad, E, S, 2, "p")
    with pytest.raises(InputError, match="only copy"):
        sp.slot_moves(TARGET, sp.slot_target(sp.per_rank(STUCK, E, S, 2, "p"), TARGET))
    # two sole copies trade ranks with a slot free before and after: one goes through it (an extra add)
    swap = sp.slot_target(sp.per_rank([0, 1, 1, 0], E, S, 2, "p"), [0, 1, -1, 2, 3, -1])
    assert swap == [0, 3, -1, 2, 1, -1] and sp.primary_ranks(swap, E, 2) == [0, 1, 1, 0]
    assert sp.slot_moves([0, 1, -1, 2, 3, -1], swap) == [("add", 1, 2), ("remove", 1), ("add", 3, 1), ("remove", 4),
                                                          ("add", 1, 4), ("remove", 2)]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
