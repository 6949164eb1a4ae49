"""The loop (moeload.act.loop.Replacer) on a real DeepSpeed MoE model over 2 gloo ranks, with a real LoadTracer.

This file is also the worker: pytest runs it under `torch.distributed.run` (_workers.launch); each rank
writes what it saw to rank<r>.json. The scenario and its checks are _workers.py's, shared with
test_megatron_loop.py. Two identical runs of a model whose gates are biased towards experts 0 and 1 (both on rank 0
in the contiguous layout): A is traced only; B is traced and has a Replacer checking every 2 steps. At
step 2 its plan moves experts 0 and 1 together to rank 1 (no gain: not applied); then it is given a
plan that splits them (0, 2 on rank 0; 1, 3 on rank 1), applied at step 4; at step 6 the plan is the
map in force (nothing to do; the same at step 8). Then a plan of the wrong size: rank 0's error reaches
every rank as one warning, nothing moves.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from _workers import (
    BAD,
    GOOD,
    LOOP_STEPS,
    DeepSpeedNet,
    check_replacer_history,
    check_trace_follows_change,
    deepspeed_engine,
    deepspeed_step,
    deepspeed_world,
    launch,
    replacer_run,
    write_result,
)

H, TOKENS, E = 16, 32, 4


def _worker(out: Path) -> None:
    import torch

    rank, _ = deepspeed_world()
    from moeload.act.deepspeed import expert_to_rank

    def engine() -> object:
        torch.manual_seed(0)
        model = DeepSpeedNet(H, E, 2, ((1, False), (2, False)))
        with torch.no_grad():
            for m in model.moe:  # skewed routing: inputs have mean 1, so experts 0 and 1 win nearly every token
                m.deepspeed_moe.gate.wg.weight[:2] += 0.5
        return deepspeed_engine(model)

    gen = torch.Generator().manual_seed(1000 + rank)
    xs = [torch.randn(1, TOKENS, H, generator=gen) + 1.0 for _ in range(LOOP_STEPS)]

    def run(name: str, replace: bool) -> dict:
        eng = engine()
        return replacer_run(eng.module, eng, lambda t: deepspeed_step(eng, xs[t]), out / name, replace,
                            lambda: [expert_to_rank(m) for m in eng.module.moe])

    write_result(out, {"A": run("a", False), "B": run("b", True), "rank": rank})


pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("loop")
    return out, launch(__file__, out)


@pytest.mark.slow
def test_replacer_applies_the_plan_that_pays_and_training_is_unchanged(ranks):
    check_replacer_history(ranks[1])


@pytest.mark.slow
def test_the_trace_holds_the_change_and_gpu_loads_follow_it(ranks):
    check_trace_follows_change(ranks[0], skew=0.75)  # the skew: experts 0 and 1 take > 75 % of the routes


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
    from moeload.online import OnlinePlanner

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
