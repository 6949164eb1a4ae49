"""Checkpoints after a re-placement (moeload.act.checkpoint) on real DeepSpeed MoE layers, 2 gloo ranks on CPU.

This file is also the worker, launched twice under `torch.distributed.run` (two process groups, two sets
of processes). "train": A is never permuted; B is permuted after step K; after step N both save
(torch.save per rank of the module's and the optimizer's state dicts, and B also its layout); both go on
to N + M. "resume": fresh models from another seed load the checkpoint and go on to N + M:
R1 starts contiguous and loads into the saved layout; R2 the same, then goes back to the contiguous layout;
R3 starts in another permuted layout; R4 (the control) loads B's files without the layout. A, B, R1 and R3
are traced; R1's tracer is told the loaded layout (record_layout), R3's is not. Each rank
writes what it measured to <phase>_rank<r>.json; the tests below check it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from _workers import (
    DeepSpeedNet,
    deepspeed_engine,
    deepspeed_step,
    deepspeed_world,
    launch,
    load_checkpoint,
    save_checkpoint,
    state_diff,
    write_result,
)

H, TOKENS, E, K, N, M = 16, 32, 4, 2, 4, 3
MAPS = ([1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0])  # B after step K: layers 0, 1, 2
OTHER = ([0, 1, 1, 0], [0, 1, 0, 1], [1, 0, 0, 1])  # R3's layout before it loads


def _worker(out: Path, phase: str) -> None:
    import torch

    rank, _ = deepspeed_world()
    from moeload import LoadTracer
    from moeload.act.checkpoint import apply_layout, layout_state_dict, record_layout
    from moeload.act.deepspeed import expert_to_rank, permute_experts
    from moeload.errors import InputError

    def engine(seed: int) -> object:
        torch.manual_seed(seed)
        return deepspeed_engine(DeepSpeedNet(H, E, 2, ((1, False), (2, False), (1, True))))

    gen = torch.Generator().manual_seed(1000 + rank)  # different tokens on each rank, the same in both phases
    xs = [torch.randn(1, TOKENS, H, generator=gen) for _ in range(N + M)]

    def step(eng: object, t: int, tracer: LoadTracer | None = None) -> float:
        torch.manual_seed(10 + t)
        loss = deepspeed_step(eng, xs[t])
        if tracer is not None:
            tracer.step()
        return loss

    def traced(eng: object, name: str, start: int) -> LoadTracer:
        tracer = LoadTracer(eng.module, out / f"trace_{name}", flush_every=1, fsync=False)
        tracer.load_state_dict({"step": start})
        return tracer.start()

    def ckpt(name: str) -> Path:
        return out / f"{name}_rank{rank}.pt"

    def save(eng: object, name: str, layout: bool) -> None:
        save_checkpoint(ckpt(name), eng.module, eng.optimizer, layout_state_dict(eng) if layout else None)

    def load(eng: object, name: str) -> None:
        load_checkpoint(ckpt(name), eng.module, eng.optimizer)

    def diff(eng: object, ref: dict) -> dict:
        return state_diff(eng.module, eng.optimizer, ref)

    def maps(eng: object) -> list:
        return [expert_to_rank(m) for m in eng.module.moe]

    res: dict = {"rank": rank}
    if phase == "train":
        A, B = engine(0), engine(0)
        ta, tb = traced(A, "a", 0), traced(B, "b", 0)
        losses: dict = {"A": [], "B": []}
        for t in range(N + M):
            if t == K:
                for m, mp in zip(B.module.moe, MAPS):
                    permute_experts(m, mp, B)
                res["recorded_B"] = record_layout(tb, B)
            if t == N:
                save(A, "ref", layout=False)
                save(B, "ckpt", layout=True)
                res["layout"] = torch.load(ckpt("ckpt"))["layout"]
            losses["A"].append(step(A, t, ta))
            losses["B"].append(step(B, t, tb))
        ta.close()
        tb.close()
        res["losses"] = losses
    else:
        ck, ref = torch.load(ckpt("ckpt")), torch.load(ckpt("ref"))
        R1, R2, R3, R4 = (engine(7) for _ in range(4))
        # refused on every rank before anything moves
        errors = []
        before = [p.detach().clone() for p in R1.module.parameters()]
        wrong_map = {**ck["layout"], "layers": {**ck["layout"]["layers"],
                                                "moe.1": {**ck["layout"]["layers"]["moe.1"], "expert_to_rank": OTHER[1]}}}
        missing = {**ck["layout"], "layers": {k: v for k, v in ck["layout"]["layers"].items() if k != "moe.2"}}
        for bad in ("contig", {"layers": {}}, missing, wrong_map if rank == 0 else ck["layout"]):
            try:
                apply_layout(R1, bad, R1)
                errors.append(None)
            except InputError as e:
                errors.append(str(e))
        res["errors"] = errors
        res["unchanged_after_errors"] = all(torch.equal(a, p) for a, p in zip(before, R1.module.parameters()))
        res["map_after_errors"] = maps(R1)

        res["stats"] = {}
        res["stats"]["R1"] = apply_layout(R1, ck["layout"], R1)
        load(R1, "ckpt")
        res["maps_R1"] = maps(R1)
        res["diff_R1"] = diff(R1, ck)  # the loaded state is the saved one, slot by slot

        apply_layout(R2, ck["layout"], R2)
        load(R2, "ckpt")
        res["stats"]["R2_back"] = apply_layout(R2, "contiguous", R2)
        res["stats"]["R2_again"] = apply_layout(R2, "contiguous", R2)  # already there: nothing moves
        res["maps_R2"] = maps(R2)
        res["diff_R2"] = diff(R2, ref)  # contiguous again: slot e holds logical expert e, as in A

        for m, mp in zip(R3.module.moe, OTHER):
            permute_experts(m, mp, R3)
        apply_layout(R3, ck["layout"], R3)
        load(R3, "ckpt")
        res["maps_R3"] = maps(R3)

        load(R4, "ckpt")  # the control: without the layout, slot e is taken for logical expert e
        res["maps_R4"] = maps(R4)
        res["diff_R4"] = diff(R4, ref)
        # R1's trace continues from step N and is told the layout; R3's (the control) is not: it counts slots
        t1, t3 = traced(R1, "r1", N), traced(R3, "r3", N)
        res["recorded_R1"] = record_layout(t1, R1)
        res["losses"] = {name: [step(eng, t, tracer) for t in range(N, N + M)]
                         for name, eng, tracer in (("R1", R1, t1), ("R2", R2, None), ("R3", R3, t3), ("R4", R4, None))}
        t1.close()
        t3.close()
    write_result(out, res, prefix=f"{phase}_")


pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    """The two phases, each a fresh 2-rank gloo launch over the same directory -> {"train", "resume": what
    each rank measured, "out": the directory}."""
    out = tmp_path_factory.mktemp("act_ckpt")
    return {"out": out, **{phase: launch(__file__, out, phase, prefix=f"{phase}_") for phase in ("train", "resume")}}


@pytest.mark.slow
def test_the_layout_is_saved_and_training_resumes_identically(ranks):
    for tr, rs in zip(ranks["train"], ranks["resume"]):
        assert tr["layout"]["layers"] == {f"moe.{i}": {"backend": "deepspeed", "ep_size": 2, "expert_to_rank": list(m)}
                                          for i, m in enumerate(MAPS)}
        la, lb = np.array(tr["losses"]["A"]), np.array(tr["losses"]["B"])
        np.testing.assert_allclose(lb, la, rtol=1e-6, atol=0)  # the re-placement at step K changed nothing
        assert rs["maps_R1"] == rs["maps_R3"] == [list(m) for m in MAPS]
        assert max(rs["diff_R1"].values()) == 0.0
        s1 = rs["stats"]["R1"]
        assert [s1[f"moe.{i}"]["experts_moved"] for i in range(3)] == [2, 4, 2] and s1["moe.0"]["bytes_sent"] > 0
        for name in ("R1", "R3"):  # into the saved layout, from the contiguous one and from another
            np.testing.assert_allclose(rs["losses"][name], lb[N:], rtol=1e-6, atol=0)


@pytest.mark.slow
def test_loading_into_the_contiguous_layout_moves_experts_router_rows_and_adam_moments_back(ranks):
    for tr, rs in zip(ranks["train"], ranks["resume"]):
        assert rs["maps_R2"] == [[0, 0, 1, 1]] * 3
        assert {"model", "exp_avg", "exp_avg_sq", "step"} <= set(rs["diff_R2"])
        assert max(rs["diff_R2"].values()) <= 1e-6, rs["diff_R2"]  # element-wise A's state at step N
        assert [s["experts_moved"] for s in rs["stats"]["R2_again"].values()] == [0, 0, 0]
        np.testing.assert_allclose(rs["losses"]["R2"], np.array(tr["losses"]["A"])[N:], rtol=1e-6, atol=0)
        # the control: loaded without the layout, the model computes the same function (gate rows and experts
        # are both by slot), so the losses cannot tell; but its experts are not where the map says
        assert rs["maps_R4"] == [[0, 0, 1, 1]] * 3
        assert rs["diff_R4"]["model"] > 1e-3 and rs["diff_R4"]["exp_avg"] > 1e-6
        np.testing.assert_allclose(rs["losses"]["R4"], np.array(tr["losses"]["B"])[N:], rtol=1e-6, atol=0)


@pytest.mark.slow
def test_a_layout_that_does_not_fit_is_refused_on_every_rank_before_anything_moves(ranks):
    for rs in ranks["resume"]:
        errs = rs["errors"]
        assert None not in errs, errs
        assert "expected 'contiguous' or a layout_state_dict()" in errs[0] and "got 'contig'" in errs[0]
        assert "expected 'contiguous'" in errs[1]  # no format key
        assert "do not match the model's (not saved: ['moe.2']" in errs[2]
        assert "ranks 0 and 1 were given different maps for layer 'moe.1'" in errs[3]
        assert rs["unchanged_after_errors"] and rs["map_after_errors"] == [[0, 0, 1, 1]] * 3


def test_layout_state_dict_refuses_a_model_without_moe_layers():
    import torch

    from moeload.act.checkpoint import apply_layout, layout_state_dict
    from moeload.errors import InputError

    with pytest.raises(InputError, match="Linear has no DeepSpeed MoE or megatron-core MoELayer layer"):
        layout_state_dict(torch.nn.Linear(2, 2))
    with pytest.raises(InputError, match="Linear has no DeepSpeed MoE"):
        apply_layout(torch.nn.Linear(2, 2), "contiguous")



@pytest.mark.slow
def test_a_resumed_trace_told_the_layout_counts_logical_experts(ranks):
    from moeload import open_trace

    out = ranks["out"]
    gates = [f"moe.{i}.deepspeed_moe.gate" for i in range(3)]
    assert ranks["train"][0]["recorded_B"] == ranks["resume"][0]["recorded_R1"] == gates
    a, b, r1, r3 = (open_trace(out / f"trace_{n}") for n in ("a", "b", "r1", "r3"))
    assert r1.steps.tolist() == r3.steps.tolist() == list(range(N, N + M))
    ca = a.counts()
    np.testing.assert_array_equal(b.counts(), ca)  # the re-placement at step K: counts stay logical
    np.testing.assert_array_equal(r1.counts(), ca[N:])  # and so after the resume
    assert r1.meta["rank_map_changes"] == [{"step": N, "layer": i, "expert_to_rank": list(m)} for i, m in enumerate(MAPS)]
    np.testing.assert_array_equal(r1.gpu_loads(), b.gpu_loads()[N:])
    assert not np.array_equal(r3.counts(), ca[N:])  # the control counted slots, not experts


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
