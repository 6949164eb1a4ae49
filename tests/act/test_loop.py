"""The loop (moeload.act.loop.Replacer) on a real DeepSpeed MoE model over 2 gloo ranks, with a real LoadTracer.

This file is also the worker: pytest runs it under `torch.distributed.run`; rank 0 writes what it saw to
rank0.json. Two identical runs of a model whose gates are biased towards experts 0 and 1 (both on rank 0
in the contiguous layout): A is traced only; B is traced and has a Replacer checking every 2 steps. At
step 2 its plan moves experts 0 and 1 together to rank 1 (no gain: not applied); then it is given a
plan that splits them (0, 2 on rank 0; 1, 3 on rank 1), applied at step 4; at step 6 the plan is the
map in force (nothing to do; the same at step 8). Then a plan of the wrong size: rank 0's error reaches
every rank as one warning, nothing moves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

H, TOKENS, STEPS, E = 16, 32, 8, 4
BAD, GOOD = [1, 1, 0, 0], [0, 1, 0, 1]


def _worker(out: Path) -> None:
    import datetime

    import deepspeed
    import deepspeed.ops
    import torch
    from torch import nn

    torch.set_num_threads(1)
    deepspeed.ops.__compatible_ops__ = {}  # no C++ op build on a CPU-only torch; gloo does the collectives
    deepspeed.init_distributed("gloo", timeout=datetime.timedelta(seconds=60))
    from deepspeed.moe.layer import MoE

    from moeload import LoadTracer
    from moeload.act.deepspeed import expert_to_rank
    from moeload.act.loop import Replacer
    from moeload.advise.cost import Calibration

    dist = torch.distributed
    rank = dist.get_rank()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.moe = nn.ModuleList(
                MoE(H, nn.Sequential(nn.Linear(H, 2 * H), nn.GELU(), nn.Linear(2 * H, H)), num_experts=E,
                    ep_size=2, k=k, min_capacity=1, drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
                for k in (1, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            aux = 0.0
            for m in self.moe:
                y, l_aux, _ = m(x)
                x, aux = x + y, aux + l_aux
            return x.pow(2).mean() + 0.01 * aux

    def engine() -> object:
        torch.manual_seed(0)
        model = Net()
        with torch.no_grad():
            for m in model.moe:  # skewed routing: inputs have mean 1, so experts 0 and 1 win nearly every token
                m.deepspeed_moe.gate.wg.weight[:2] += 0.5
        cfg = {"train_micro_batch_size_per_gpu": 1,
               "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True, "adam_w_mode": False}}}
        return deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())[0]

    gen = torch.Generator().manual_seed(1000 + rank)
    xs = [torch.randn(1, TOKENS, H, generator=gen) + 1.0 for _ in range(STEPS)]

    import warnings

    def run(name: str, replace: bool) -> dict:
        eng = engine()
        tracer = LoadTracer(eng.module, out / name, flush_every=2, fsync=False)
        cal = Calibration(tokens=(0.0, 1e4), seconds=(0.0, 1e-2))  # 1 us per route on the busiest GPU
        rep = Replacer(tracer, [BAD, BAD], optimizer=eng, every=2, horizon=4, window=2, calibration=cal) if replace else None
        losses = []
        with tracer:
            for t in range(STEPS):
                loss = eng(xs[t])
                eng.backward(loss)
                eng.step()
                losses.append(float(loss.detach()))
                tracer.step()
                if rep is not None:
                    rep.on_step_end()
                    if tracer.step_count == 2:
                        rep.set_plan([GOOD, GOOD])
            caught = []
            if rep is not None:  # a plan that does not fit fails on rank 0 only: every rank warns, nothing moves
                rep.set_plan([[0, 1], [0, 1]])
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    rep.check()
        return {"losses": losses, "history": [] if rep is None else rep.history,
                "maps": [expert_to_rank(m) for m in eng.module.moe], "warned": [str(w.message) for w in caught]}

    res = {"A": run("a", False), "B": run("b", True), "rank": rank}
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.barrier()


pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tracing"))
    from _shims import free_port

    out = tmp_path_factory.mktemp("loop")
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, str(out)]
    env = {**os.environ, "DS_BUILD_OPS": "0", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=root, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return out, [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]


@pytest.mark.slow
def test_replacer_applies_the_plan_that_pays_and_training_is_unchanged(ranks):
    _, rs = ranks
    for r in rs:
        h = r["B"]["history"]
        assert [d["step"] for d in h] == [2, 4, 6, 8, 8]
        # step 2: both experts to rank 1 is as unbalanced as before: no gain, not applied
        assert h[0]["apply"] == {} and set(h[0]["layers"]) == {"0", "1"}
        assert all(v["gain_s"] <= v["cost_s"] for v in h[0]["layers"].values())
        # step 4: splitting experts 0 and 1 halves the busiest GPU's routes: applied on both layers
        assert h[1]["apply"] == {"0": GOOD, "1": GOOD}
        for v in h[1]["layers"].values():
            assert v["gain_s"] > v["cost_s"] > 0 and v["after_s"] < v["before_s"]
            assert v["experts_moved"] == 2 and v["bytes_total"] > 0 and v["seconds"] > 0
        assert all(d["apply"] == {} and d["why"] == "the plan is the map in force" for d in h[2:4])
        assert "plan[0]: expected 4 entries" in h[4]["error"] and h[4]["apply"] == {}
        assert len(r["B"]["warned"]) == 1 and "re-placement check at step 8 failed on rank 0" in r["B"]["warned"][0]
        assert r["B"]["maps"] == [GOOD, GOOD] and r["A"]["maps"] == [[0, 0, 1, 1]] * 2
        # re-placement is transparent: the same losses as the run without it
        np.testing.assert_allclose(r["B"]["losses"], r["A"]["losses"], rtol=1e-6, atol=0)
    # one decision (rank 0's, broadcast); only the measured bytes and seconds are each rank's own
    strip = [[{**d, "layers": {k: {n: x for n, x in v.items() if n != "seconds"} for k, v in d["layers"].items()}}
              for d in r["B"]["history"]] for r in rs]
    assert strip[0] == strip[1]


@pytest.mark.slow
def test_the_trace_holds_the_change_and_gpu_loads_follow_it(ranks):
    from moeload import open_trace

    out, _ = ranks
    a, b = open_trace(out / "a"), open_trace(out / "b")
    assert a.meta["rank_map_changes"] == []
    assert b.meta["rank_map_changes"] == [{"step": 4, "layer": 0, "expert_to_rank": GOOD},
                                          {"step": 4, "layer": 1, "expert_to_rank": GOOD}]
    c = b.counts()
    np.testing.assert_array_equal(c, a.counts())  # counts stay per logical expert across the change
    assert (c[:, :, :2].sum(-1) > 0.75 * c.sum(-1)).all()  # the skew: experts 0 and 1 take > 75 % of the routes
    ga, gb = a.gpu_loads(), b.gpu_loads()
    np.testing.assert_array_equal(gb[:4], ga[:4])
    np.testing.assert_array_equal(gb[4:], np.stack([c[4:, :, 0::2].sum(-1), c[4:, :, 1::2].sum(-1)], -1))
    assert (gb[4:].max(-1) < ga[4:].max(-1)).all()  # the busiest GPU got lighter after the change


def test_plan_maps_from_a_placement_and_bad_plans():
    from moeload import placement
    from moeload.act.loop import plan_maps
    from moeload.errors import InputError

    w = np.array([[90.0, 80, 5, 5], [1, 1, 50, 60]])
    pl = placement.plan(w, num_gpus=2, num_replicas=4, policy="eplb")
    maps = plan_maps(pl, [4, 4], 2)
    for li in range(2):  # the heavy pair is split over the two ranks
        assert sorted(maps[li]) == [0, 0, 1, 1] and maps[li][int(np.argsort(w[li])[-1])] != maps[li][int(np.argsort(w[li])[-2])]
        slots = np.asarray(pl.phy2log[li])
        assert [maps[li][e] for e in slots] == [0, 0, 1, 1]  # slot s on GPU s // 2
    assert plan_maps([GOOD, BAD], [4, 4], 2) == [GOOD, BAD]
    with pytest.raises(InputError, match="expected 2 expert->rank maps"):
        plan_maps([GOOD], [4, 4], 2)
    with pytest.raises(InputError, match=r"plan\[1\]: each of the 2 ranks must hold 2 experts"):
        plan_maps([GOOD, [0, 0, 0, 1]], [4, 4], 2)
    with pytest.raises(InputError, match="no replicas"):
        plan_maps(placement.plan(w, num_gpus=2, num_replicas=6, policy="eplb"), [4, 4], 2)


def test_plan_maps_from_an_online_planner():
    from moeload.act.loop import plan_maps
    from moeload.errors import InputError
    from moeload.tracing.callbacks.online import OnlinePlanner

    planner = OnlinePlanner(num_gpus=2, layers=["a"], horizon=10, window=5)
    with pytest.raises(InputError, match="no plan yet"):
        plan_maps(planner, [4], 2)
    counts = np.tile([[[60, 50, 5, 5]]], (40, 1, 1))  # experts 0 and 1 (both on GPU 0) are hot
    planner.feed(np.arange(40), counts)
    m = plan_maps(planner, [4], 2)[0]
    assert sorted(m) == [0, 0, 1, 1] and m[0] != m[1]


def test_replacer_refuses_a_model_without_deepspeed_moe_layers(tmp_path):
    import torch

    from moeload import LoadTracer
    from moeload.act.loop import Replacer
    from moeload.errors import InputError

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.gate(x)

    tr = LoadTracer(Net(), tmp_path / "t", gates="gate", top_k=1)
    with pytest.raises(InputError, match=r"traced layer\(s\) \['gate'\] are not gates of deepspeed.moe.layer.MoE"):
        Replacer(tr, [[0, 0, 1, 1]])


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
