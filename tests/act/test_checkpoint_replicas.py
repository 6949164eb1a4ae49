"""Resuming from a checkpoint saved after a Replacer replica change (moeload.act.loop, moeload.act.replicas) on
real DeepSpeed MoE layers, 2 gloo ranks on CPU, in two separate launches (two process groups).

This file is also the worker. "train": B has 6 slots for 4 experts (replica gates, the gates favour expert 0),
a traced LoadTracer, a Replacer checking every 2 steps and `sync_replica_grads` every step. At step 2 it applies
an EPLB plan to layer 0 (expert 0 in three slots, experts 1 and 3 change ranks; layer 1 would not gain, so it
keeps its first slot map); after step N each rank saves the module's
and the optimizer's state dicts (the slot map is in the module's, the gate's extra state) and the tracer's and
the Replacer's state; then the plan becomes BACK (expert 1's primary back to rank 0, one copy of expert 0
fewer) and B goes on to STEPS, where it saves again ("end"). "resume": a fresh engine from another seed loads
the step-N files, a new tracer continues the step numbers and is told the slot maps (`record_layout`), a new
Replacer gets BACK and the saved history, and it trains steps N .. STEPS - 1. Each rank writes what it measured
to <phase>_rank<r>.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from _workers import (
    DeepSpeedNet,
    deepspeed_engine,
    deepspeed_world,
    replica_copy_diff,
    state_diff,
    strip_seconds,
    two_phase_ranks,
    write_result,
)

H, TOKENS, E, S, N, STEPS = 16, 32, 4, 6, 4, 8
LAYERS = ((1, False), (2, False))
TARGET = [0, 0, 3, 2, 0, 1]  # the EPLB plan at step 2 (as tests/act/test_loop_replicas.py)
BACK = [0, 1, 3, 2, 0, -1]  # the plan from step N: expert 1 home again (its copy sent from rank 1), slot 5 free
INITIAL = [0, 1, -1, 2, 3, -1]  # the replica layer's first slot map (one copy each, one free slot per rank)
BACK_OPS = ([["remove", 1], ["add", 1, 1], ["remove", 5]],  # layer 0, from TARGET: expert 1's copy sent home
            [["add", 3, 2], ["remove", 4], ["add", 0, 4]])  # layer 1, from INITIAL: expert 3's primary to rank 0


def _worker(out: Path, phase: str) -> None:
    import torch

    rank, world = deepspeed_world()
    from moeload import LoadTracer, placement
    from moeload.act.checkpoint import layout_state_dict, record_layout
    from moeload.act.loop import Replacer
    from moeload.act.replicas import enable_replicas, replica_gate, sync_replica_grads
    from moeload.advise.cost import Calibration
    from moeload.errors import InputError

    def engine(seed: int) -> object:
        torch.manual_seed(seed)
        net = DeepSpeedNet(H, S, world, LAYERS)
        with torch.no_grad():
            for m in net.moe:  # inputs have mean 1, so expert 0 takes nearly every first choice
                enable_replicas(m, E).wg.weight[:1] += 0.5
        return deepspeed_engine(net)

    gen = torch.Generator().manual_seed(1000 + rank)  # different tokens on each rank, the same in both phases
    xs = [torch.randn(1, TOKENS, H, generator=gen) + 1.0 for _ in range(STEPS)]
    cal = Calibration(tokens=(0.0, 1e4), seconds=(0.0, 1e-2))  # 1 us per route on the busiest GPU

    def replacer(tracer: LoadTracer, eng: object, plan: object) -> Replacer:
        return Replacer(tracer, plan, optimizer=eng, every=2, horizon=4, window=2, calibration=cal)

    def step(eng: object, t: int, tracer: LoadTracer, rep: Replacer) -> float:
        loss = eng(xs[t])
        eng.backward(loss)
        sync_replica_grads(eng)
        eng.step()
        tracer.step()
        rep.on_step_end()
        return float(loss.detach())

    def ckpt(name: str) -> Path:
        return out / f"{name}_rank{rank}.pt"

    def save(name: str, eng: object, tracer: LoadTracer, rep: Replacer) -> None:
        torch.save({"model": eng.module.state_dict(), "optimizer": eng.optimizer.state_dict(),
                    "tracer": tracer.state_dict(), "replacer": rep.state_dict()}, ckpt(name))

    def slots(eng: object) -> list:
        return [replica_gate(m).slot_expert for m in eng.module.moe]

    def copy_diff(eng: object) -> float:
        return replica_copy_diff([(m.deepspeed_moe.experts.deepspeed_experts, replica_gate(m).replicated())
                                  for m in eng.module.moe], eng.optimizer)

    res: dict = {"rank": rank}
    if phase == "train":
        B = engine(0)
        eplb = placement.plan(np.array([[10.0, 1, 1, 1]] * 2), num_gpus=world, num_replicas=S, policy="eplb")
        tracer = LoadTracer(B.module, out / "trace_b", flush_every=2, fsync=False).start()
        rep = replacer(tracer, B, eplb)
        losses = []
        for t in range(STEPS):
            losses.append(step(B, t, tracer, rep))
            if tracer.step_count == N:
                save("ckpt", B, tracer, rep)
                res["slots_saved"], res["copy_diff_saved"] = slots(B), copy_diff(B)
                rep.set_plan([BACK, BACK])
        save("end", B, tracer, rep)
        tracer.close()
        try:  # the expert->rank layout has one slot per expert: refused, in one line that says what to do
            layout_state_dict(B)
            res["layout_error"] = None
        except InputError as e:
            res["layout_error"] = str(e)
        res.update(losses=losses, history=rep.history, slots=slots(B), copy_diff=copy_diff(B))
    else:
        ck, end = torch.load(ckpt("ckpt"), weights_only=False), torch.load(ckpt("end"), weights_only=False)
        R = engine(7)
        res["slots_fresh"] = slots(R)
        R.module.load_state_dict(ck["model"])  # installs the slot maps (the gates' extra state) with the slots
        R.optimizer.load_state_dict(ck["optimizer"])
        res["slots_loaded"], res["copy_diff_loaded"] = slots(R), copy_diff(R)
        res["diff_loaded"] = state_diff(R.module, R.optimizer, ck)
        tracer = LoadTracer(R.module, out / "trace_r", flush_every=2, fsync=False)
        tracer.load_state_dict(ck["tracer"])
        tracer.start()
        res["recorded"] = record_layout(tracer, R)
        rep = replacer(tracer, R, [BACK, BACK])
        rep.load_state_dict(ck["replacer"])
        res["losses"] = [step(R, t, tracer, rep) for t in range(N, STEPS)]
        tracer.close()
        res.update(history=rep.history, slots=slots(R), copy_diff=copy_diff(R),
                   diff_end=state_diff(R.module, R.optimizer, end))
    write_result(out, res, prefix=f"{phase}_")


pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    return two_phase_ranks(__file__, tmp_path_factory.mktemp("act_ckpt_replicas"))


@pytest.mark.slow
def test_a_run_resumed_after_a_replica_change_continues_the_uninterrupted_one(ranks):
    for tr, rs in zip(ranks["train"], ranks["resume"]):
        h = tr["history"]
        assert [d["step"] for d in h] == [2, 4, 6, 8]
        # before the save: layer 0 gets copies of expert 0, and the primaries of experts 1 and 3 change ranks
        assert h[0]["apply"] == {"0": TARGET} and h[0]["layers"]["1"]["gain_s"] <= h[0]["layers"]["1"]["cost_s"]
        assert h[1]["apply"] == {}
        assert tr["slots_saved"] == [TARGET, INITIAL] and tr["copy_diff_saved"] == 0.0
        # after it (step 6): both layers to BACK, each with one add that copies an expert and its Adam moments
        assert h[2]["apply"] == {"0": BACK, "1": BACK}
        for li, ops in enumerate(BACK_OPS):
            v = h[2]["layers"][str(li)]
            assert v["ops"] == ops and v["experts_moved"] == sum(op[0] == "add" for op in ops) and v["bytes_total"] > 0
        # the fresh model starts in the initial slot map; load_state_dict installs the saved one with the slots
        assert rs["slots_fresh"] == [INITIAL] * 2
        assert rs["slots_loaded"] == [TARGET, INITIAL] and rs["copy_diff_loaded"] == 0.0
        assert {"model", "exp_avg", "exp_avg_sq", "step"} <= set(rs["diff_loaded"])
        assert max(rs["diff_loaded"].values()) == 0.0
        # the resumed run: the uninterrupted run's losses, decisions (the BACK change at step 6 included), slot
        # maps and, slot by slot, its final parameters and Adam moments; the copies stay identical
        np.testing.assert_allclose(rs["losses"], tr["losses"][N:], rtol=1e-6, atol=0)
        assert strip_seconds(rs["history"]) == strip_seconds(h)
        assert rs["slots"] == tr["slots"] == [BACK, BACK]
        assert tr["copy_diff"] == rs["copy_diff"] == 0.0
        assert max(rs["diff_end"].values()) <= 1e-6, rs["diff_end"]
        # no expert->rank layout for replica layers: refused in one line that names the way to resume
        err = tr["layout_error"]
        assert err is not None and "\n" not in err and "load_state_dict restores it without a layout" in err


@pytest.mark.slow
def test_a_resumed_trace_told_the_slot_maps_follows_the_uninterrupted_one(ranks):
    from moeload import open_trace
    from moeload.act.slot_plan import primary_ranks, replica_gpu_loads

    out = ranks["out"]
    assert ranks["resume"][0]["recorded"] == ["moe.0.deepspeed_moe.gate"]  # layer 1 is in its first slot map
    b, r = open_trace(out / "trace_b"), open_trace(out / "trace_r")
    assert r.steps.tolist() == list(range(N, STEPS))
    np.testing.assert_array_equal(r.counts(), b.counts()[N:])  # counts stay per logical expert across the resume
    back = ranks["train"][0]["history"][2]["apply"]
    # record_layout puts layer 0's loaded slot map at step N, as the Replacer recorded it at step 2
    later = [{"step": 6, "layer": int(li), "slot_expert": m} for li, m in sorted(back.items())]
    assert b.meta["extra"]["replica_slot_changes"] == [{"step": 2, "layer": 0, "slot_expert": TARGET}] + later
    assert r.meta["extra"]["replica_slot_changes"] == [{"step": N, "layer": 0, "slot_expert": TARGET}] + later
    assert r.meta["rank_map_changes"] == [{"step": x["step"], "layer": x["layer"],
                                           "expert_to_rank": primary_ranks(x["slot_expert"], E, 2)}
                                          for x in r.meta["extra"]["replica_slot_changes"]]
    assert r.meta["rank_map_changes"][0]["expert_to_rank"] == [0, 1, 1, 0]
    np.testing.assert_array_equal(r.gpu_loads(), b.gpu_loads()[N:])
    np.testing.assert_array_equal(replica_gpu_loads(r), replica_gpu_loads(b)[N:])
    # without the step-N record, the resumed trace would charge every route to the home ranks until step 6
    c = r.counts()
    home = np.stack([c[:, :, :2].sum(-1), c[:, :, 2:].sum(-1)], -1)
    assert not np.array_equal(replica_gpu_loads(r)[:2, 0], home[:2, 0])


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
