"""Checkpoints of a model that mixes a replica layer and a plain re-placed layer (moeload.act.checkpoint), saved
with torch.save + `layout_state_dict` and with DeepSpeed's `engine.save_checkpoint` + the layout in a file of
its own; real DeepSpeed MoE layers, 2 gloo ranks on CPU, in two separate launches (two process groups).

This file is also the worker. "train": B has a replica layer (moe.0: 4 experts in 6 slots, top-2) and a plain
layer (moe.1: 4 experts, top-1), `sync_replica_grads` every step, and is traced. Before step K it gets a copy of
expert 0 in free slot 5 (moe.0) and the map MAP (moe.1), and the tracer is told (`record_layout`). After step N
each rank saves twice: torch.save of the module's and the optimizer's state dicts with `layout_state_dict(B)`,
and `B.save_checkpoint(out/ds, tag)` with `layout_state_dict(B)` in ds_layout_rank<r>.pt; B goes on to N + M.
"resume": fresh engines from another seed, each rank's files: R1 is refused a few wrong layouts, then
`apply_layout` + load_state_dict (torch.save files), traced with `record_layout`; R2 `apply_layout` +
`engine.load_checkpoint`; R3 (the control) `engine.load_checkpoint` without the layout, traced. Each goes on to
N + M. Each rank writes what it measured to <phase>_rank<r>.json; the tests below check it.
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
    load_checkpoint,
    save_checkpoint,
    state_diff,
    two_phase_ranks,
    write_result,
)

H, TOKENS, E, S, K, N, M = 16, 32, 4, 6, 2, 4, 3
MAP = [1, 0, 1, 0]  # moe.1 from step K: experts 0 and 3 trade ranks
SLOTS = [0, 1, -1, 2, 3, 0]  # moe.0 from step K: a copy of expert 0 in slot 5 (rank 1)
INITIAL = [0, 1, -1, 2, 3, -1]  # moe.0's first slot map
TAG = "step4"
GATES = ["moe.0.deepspeed_moe.gate", "moe.1.deepspeed_moe.gate"]


def _worker(out: Path, phase: str) -> None:
    import torch

    rank, world = deepspeed_world()
    from moeload import LoadTracer
    from moeload.act.checkpoint import apply_layout, layout_state_dict, record_layout
    from moeload.act.deepspeed import expert_to_rank, permute_experts
    from moeload.act.replicas import add_replica, enable_replicas, replica_gate, sync_replica_grads
    from moeload.errors import InputError

    def engine(seed: int) -> object:
        torch.manual_seed(seed)
        net = DeepSpeedNet(H, [S, E], world, ((2, False), (1, False)))
        enable_replicas(net.moe[0], E)
        return deepspeed_engine(net)

    gen = torch.Generator().manual_seed(1000 + rank)  # different tokens on each rank, the same in both phases
    xs = [torch.randn(1, TOKENS, H, generator=gen) for _ in range(N + M)]

    def step(eng: object, t: int, tracer: LoadTracer | None = None) -> float:
        loss = eng(xs[t])
        eng.backward(loss)
        sync_replica_grads(eng)
        eng.step()
        if tracer is not None:
            tracer.step()
        return float(loss.detach())

    def traced(eng: object, name: str, start: int) -> LoadTracer:
        tracer = LoadTracer(eng.module, out / f"trace_{name}", flush_every=1, fsync=False)
        tracer.load_state_dict({"step": start})
        return tracer.start()

    def layouts(eng: object) -> dict:
        return {"slots": replica_gate(eng.module.moe[0]).slot_expert, "map": expert_to_rank(eng.module.moe[1])}

    ckpt, ds_dir, ds_layout = out / f"ckpt_rank{rank}.pt", out / "ds", out / f"ds_layout_rank{rank}.pt"
    res: dict = {"rank": rank}
    if phase == "train":
        B = engine(0)
        tb = traced(B, "b", 0)
        losses = []
        for t in range(N + M):
            if t == K:
                add_replica(B.module.moe[0], 0, 5, B)
                permute_experts(B.module.moe[1], MAP, B)
                res["recorded_B"] = record_layout(tb, B)
            if t == N:
                res["layout"] = layout_state_dict(B)
                save_checkpoint(ckpt, B.module, B.optimizer, res["layout"])
                B.save_checkpoint(str(ds_dir), tag=TAG)
                torch.save(layout_state_dict(B), ds_layout)
                res["files"] = _deepspeed_files(B, ds_dir / TAG, rank)
            losses.append(step(B, t, tb))
        tb.close()
        res.update(losses=losses, layouts=layouts(B))
    else:
        ck = torch.load(ckpt, weights_only=False)
        R1, R2, R3 = (engine(7) for _ in range(3))
        # refused on every rank before anything moves: the replica layer called a plain one (both ranks), the
        # plain layer called a replica one (rank 0 only), the replica layer saved with other sizes (both ranks)
        saved = ck["layout"]["layers"]
        as_plain = {**saved["moe.1"], "expert_to_rank": [0, 0, 1, 1]}
        as_replica = {k: v for k, v in saved["moe.1"].items() if k != "expert_to_rank"}
        as_replica["replicas"] = {"num_experts": E, "num_slots": S}
        bad = [
            {"moe.0": as_plain, "moe.1": saved["moe.1"]},
            {"moe.0": saved["moe.0"], "moe.1": as_replica} if rank == 0 else saved,
            {"moe.0": {**saved["moe.0"], "replicas": {"num_experts": E, "num_slots": 8}}, "moe.1": saved["moe.1"]},
        ]
        before = [p.detach().clone() for p in R1.module.parameters()]
        errors = []
        for layers in bad:
            try:
                apply_layout(R1, {**ck["layout"], "layers": layers}, R1)
                errors.append(None)
            except InputError as e:
                errors.append(str(e))
        res.update(
            errors=errors,
            layouts_after_errors=layouts(R1),
            unchanged_after_errors=all(torch.equal(a, p) for a, p in zip(before, R1.module.parameters())),
        )

        res["stats_R1"] = apply_layout(R1, ck["layout"], R1)
        load_checkpoint(ckpt, R1.module, R1.optimizer)
        res.update(layouts_R1=layouts(R1), diff_R1=state_diff(R1.module, R1.optimizer, ck))

        res["layouts_R2_fresh"] = layouts(R2)
        res["stats_R2"] = apply_layout(R2, torch.load(ds_layout), R2)  # first, then DeepSpeed's load
        path, _ = R2.load_checkpoint(str(ds_dir), tag=TAG)
        res.update(
            loaded_R2=path is not None,
            global_steps_R2=R2.global_steps,
            layouts_R2=layouts(R2),
            diff_R2=state_diff(R2.module, R2.optimizer, ck),
        )

        R3.load_checkpoint(str(ds_dir), tag=TAG)  # the control: without the layout
        res.update(layouts_R3=layouts(R3), diff_R3=state_diff(R3.module, R3.optimizer, ck))

        t1, t3 = traced(R1, "r1", N), traced(R3, "r3", N)
        res["recorded_R1"], res["recorded_R3"] = record_layout(t1, R1), record_layout(t3, R3)
        res["losses"] = {
            name: [step(eng, t, tracer) for t in range(N, N + M)]
            for name, eng, tracer in (("R1", R1, t1), ("R2", R2, None), ("R3", R3, t3))
        }
        t1.close()
        t3.close()
        # back to the contiguous layout: the plain layer moves, the replica layer keeps its slot map
        with torch.no_grad():
            y = float(R1(xs[0]))
            res["stats_R1_back"] = apply_layout(R1, "contiguous", R1)
            res["forward_back"] = [y, float(R1(xs[0]))]  # the loss of one input, before and after
        res["layouts_R1_back"] = layouts(R1)
    write_result(out, res, prefix=f"{phase}_")


def _deepspeed_files(eng: object, tag_dir: Path, rank: int) -> dict:
    """What `engine.save_checkpoint` wrote: {"slot_diff": {"layer/p": max abs difference between file
    layer_<layer>_expert_<p> and this rank's slot p}, "copy_diff": rank 0: between the files of slots 5 and 0 of
    moe.0 (a copy and its primary), "extra_state": rank 0: moe.0's gate extra state in the model-states file,
    "expert_keys": rank 0: how many expert keys that file holds}."""
    import torch

    def expert_file(li: int, p: int) -> dict:
        prefix = f"moe.{li}.deepspeed_moe.experts.deepspeed_experts.{p}."
        f = torch.load(tag_dir / f"layer_{li}_expert_{p}_mp_rank_00_model_states.pt", weights_only=False)
        return {k[len(prefix) :]: v for k, v in f.items()}

    out: dict = {"slot_diff": {}}
    for li, m in enumerate(eng.module.moe):
        experts = m.deepspeed_moe.experts.deepspeed_experts
        for j, ex in enumerate(experts):
            p, f = rank * len(experts) + j, expert_file(li, rank * len(experts) + j)
            assert set(f) == set(ex.state_dict())
            out["slot_diff"][f"{li}/{p}"] = max(float((v - f[k]).abs().max()) for k, v in ex.state_dict().items())
    if rank == 0:
        a, b = expert_file(0, 5), expert_file(0, 0)
        out["copy_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)
        module = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        out["extra_state"] = module["moe.0.deepspeed_moe.gate._extra_state"]
        out["expert_keys"] = sum("deepspeed_experts" in k for k in module)
    return out


pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    return two_phase_ranks(__file__, tmp_path_factory.mktemp("act_ckpt_mixed"))


@pytest.mark.slow
def test_a_mixed_model_saves_its_plain_layers_maps_and_resumes_identically(ranks):
    for tr, rs in zip(ranks["train"], ranks["resume"]):
        assert tr["layout"]["layers"] == {
            "moe.0": {"backend": "deepspeed", "ep_size": 2, "replicas": {"num_experts": E, "num_slots": S}},
            "moe.1": {"backend": "deepspeed", "ep_size": 2, "expert_to_rank": MAP},
        }
        assert tr["layouts"] == {"slots": SLOTS, "map": MAP}
        # apply_layout moves the plain layer only (experts 0 and 3); load_state_dict installs the slot map
        assert list(rs["stats_R1"]) == ["moe.1"] and rs["stats_R1"]["moe.1"]["experts_moved"] == 2
        assert rs["layouts_R1"] == {"slots": SLOTS, "map": MAP}
        assert {"model", "exp_avg", "exp_avg_sq", "step"} <= set(rs["diff_R1"])
        assert max(rs["diff_R1"].values()) == 0.0  # slot by slot the saved state
        np.testing.assert_allclose(rs["losses"]["R1"], tr["losses"][N:], rtol=1e-6, atol=0)
        # "contiguous" on a mixed model: the plain layer goes back, the replica layer keeps its slots
        assert list(rs["stats_R1_back"]) == ["moe.1"] and rs["stats_R1_back"]["moe.1"]["experts_moved"] == 2
        assert rs["layouts_R1_back"] == {"slots": SLOTS, "map": [0, 0, 1, 1]}
        np.testing.assert_allclose(rs["forward_back"][1], rs["forward_back"][0], rtol=1e-6, atol=0)


@pytest.mark.slow
def test_a_layout_that_calls_a_layer_the_wrong_kind_is_refused_on_every_rank_before_anything_moves(ranks):
    for rs in ranks["resume"]:
        errs = rs["errors"]
        assert None not in errs and not any("\n" in e for e in errs), errs
        assert (
            "layer 'moe.0' was saved as a plain layer, the model's is a replica layer (4 experts in 6 slots)" in errs[0]
        )
        assert (
            "layer 'moe.1' was saved as a replica layer (4 experts in 6 slots), the model's is a plain layer" in errs[1]
        )
        assert errs[1].startswith("rank 0: ") if rs["rank"] == 1 else errs[1].startswith("layout: ")
        assert (
            "saved as a replica layer (4 experts in 8 slots), the model's is a replica layer (4 experts in 6" in errs[2]
        )
        assert rs["unchanged_after_errors"] and rs["layouts_after_errors"] == {"slots": INITIAL, "map": [0, 0, 1, 1]}


@pytest.mark.slow
def test_a_resumed_trace_of_a_mixed_model_told_the_layout_follows_the_uninterrupted_one(ranks):
    from moeload import open_trace
    from moeload.act.slot_plan import primary_ranks, replica_gpu_loads

    out = ranks["out"]
    assert ranks["train"][0]["recorded_B"] == ranks["resume"][0]["recorded_R1"] == GATES
    b, r1, r3 = (open_trace(out / f"trace_{n}") for n in ("b", "r1", "r3"))
    assert r1.steps.tolist() == r3.steps.tolist() == list(range(N, N + M))
    np.testing.assert_array_equal(r1.counts(), b.counts()[N:])  # per logical expert in both layers
    changes = [{"layer": 0, "expert_to_rank": primary_ranks(SLOTS, E, 2)}, {"layer": 1, "expert_to_rank": MAP}]
    assert b.meta["rank_map_changes"] == [{"step": K, **c} for c in changes]
    assert r1.meta["rank_map_changes"] == [{"step": N, **c} for c in changes]
    assert b.meta["extra"]["replica_slot_changes"] == [{"step": K, "layer": 0, "slot_expert": SLOTS}]
    assert r1.meta["extra"]["replica_slot_changes"] == [{"step": N, "layer": 0, "slot_expert": SLOTS}]
    np.testing.assert_array_equal(r1.gpu_loads(), b.gpu_loads()[N:])
    np.testing.assert_array_equal(replica_gpu_loads(r1), replica_gpu_loads(b)[N:])
    # the control (DeepSpeed's files without the layout): the replica layer is right, the plain one counts slots
    assert ranks["resume"][0]["recorded_R3"] == GATES[:1]
    np.testing.assert_array_equal(r3.counts()[:, 0], b.counts()[N:, 0])
    assert not np.array_equal(r3.counts()[:, 1], b.counts()[N:, 1])


@pytest.mark.slow
def test_deepspeed_save_checkpoint_holds_experts_by_slot_and_resumes_with_the_layout_applied_first(ranks):
    for tr, rs in zip(ranks["train"], ranks["resume"]):
        f = tr["files"]
        # layer_<i>_expert_<p>: DeepSpeed names the files by slot p, whatever expert the slot holds (for moe.1,
        # slot 0 holds logical expert 1; moe.0's slot 2 is free, its slot 5 a copy of expert 0)
        assert sorted(f["slot_diff"]) == (
            ["0/0", "0/1", "0/2", "1/0", "1/1"] if tr["rank"] == 0 else ["0/3", "0/4", "0/5", "1/2", "1/3"]
        )
        assert max(f["slot_diff"].values()) == 0.0
        if tr["rank"] == 0:
            assert f["copy_diff"] == 0.0  # a copy is saved in its own slot's file, like any other slot
            assert f["extra_state"] == {"slot_expert": SLOTS}  # the slot map: in the non-expert model states
            assert f["expert_keys"] == 0
        # apply_layout, then engine.load_checkpoint: the saved state slot by slot, and the uninterrupted losses
        assert rs["layouts_R2_fresh"] == {"slots": INITIAL, "map": [0, 0, 1, 1]}
        assert list(rs["stats_R2"]) == ["moe.1"] and rs["stats_R2"]["moe.1"]["experts_moved"] == 2
        assert rs["loaded_R2"] and rs["global_steps_R2"] == N
        assert rs["layouts_R2"] == {"slots": SLOTS, "map": MAP}
        assert {"model", "exp_avg", "exp_avg_sq", "step"} <= set(rs["diff_R2"])
        assert max(rs["diff_R2"].values()) == 0.0
        np.testing.assert_allclose(rs["losses"]["R2"], tr["losses"][N:], rtol=1e-6, atol=0)
        # the control, loaded without the layout: the slot map comes back (the gate's extra state), the plain
        # layer's map does not; the same state slot by slot, so the same losses, but experts under wrong labels
        assert rs["layouts_R3"] == {"slots": SLOTS, "map": [0, 0, 1, 1]}
        assert max(rs["diff_R3"].values()) == 0.0
        np.testing.assert_allclose(rs["losses"]["R3"], tr["losses"][N:], rtol=1e-6, atol=0)


def test_layouts_of_mixed_and_replica_only_models_in_one_process():
    """ep_size 1, no process group: a replica layer's entry has its sizes, not a map; a layout fits only a model
    with the same kind of layer at each path; a model of replica layers only has no layout (one line)."""
    pytest.importorskip("deepspeed")
    import json

    import torch
    from deepspeed.moe.layer import MoE

    from moeload.act.checkpoint import apply_layout, layout_state_dict
    from moeload.act.replicas import enable_replicas
    from moeload.errors import InputError

    def layer(n: int, replicas: bool) -> MoE:
        ex = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
        m = MoE(8, ex, num_experts=n, ep_size=1, k=1, min_capacity=1, use_rts=False)
        if replicas:
            enable_replicas(m, 4)
        return m

    torch.manual_seed(0)
    mixed = torch.nn.ModuleList([layer(6, True), layer(4, False)])
    layout = json.loads(json.dumps(layout_state_dict(mixed)))  # plain lists and strings
    assert layout["layers"] == {
        "0": {"backend": "deepspeed", "ep_size": 1, "replicas": {"num_experts": 4, "num_slots": 6}},
        "1": {"backend": "deepspeed", "ep_size": 1, "expert_to_rank": [0, 0, 0, 0]},
    }
    assert list(apply_layout(mixed, layout)) == ["1"] and list(apply_layout(mixed, "contiguous")) == ["1"]
    with pytest.raises(
        InputError, match=r"layer '0' was saved as a replica layer \(4 experts in 6 slots\), the model's is a plain"
    ):
        apply_layout(torch.nn.ModuleList([layer(4, False), layer(4, False)]), layout)
    only = torch.nn.ModuleList([layer(6, True)])
    for call in (
        lambda: layout_state_dict(only),
        lambda: apply_layout(only, "contiguous"),
        lambda: apply_layout(only, layout),
    ):
        with pytest.raises(InputError, match="every MoE layer of ModuleList is a replica layer") as e:
            call()
        assert "load_state_dict restores it without a layout" in str(e.value) and "\n" not in str(e.value)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
