"""permute_experts on real DeepSpeed MoE layers, gloo processes on CPU: 2 ranks (ep_size 2, 4 experts)
and 4 ranks (ep_size 4, 8 experts).

This file is also the worker: pytest runs it under `torch.distributed.run` (_workers.launch, once per
world size); each rank writes what it measured to rank<r>.json and the tests below check it. Three
identical models (same seed, same per-rank inputs, DeepSpeed engines with torch Adam): A is never
permuted; B is permuted after step 2 and again after step 3, with its optimizer; C is permuted after
step 2 without its optimizer (the control: Adam's moments stay behind, so its losses must part from A's).
Layer 0 is top-1, layer 1 top-2, both drop_tokens=False; layer 2 top-1 with capacity factor 1, so it
drops tokens (use_rts=False: which tokens is then a function of each expert's column alone).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from _workers import (
    INVALID,
    DeepSpeedNet,
    by_logical,
    check_refusals,
    check_training_identical,
    deepspeed_engine,
    deepspeed_step,
    deepspeed_world,
    launch,
    max_diff,
    refusals,
    rows,
    write_result,
)

H, TOKENS, STEPS = 16, 32, 5
E = 4  # experts on 2 ranks; 2 per rank on 4 ranks too
MAPS_1 = ([1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0])  # after step 2: layers 0, 1, 2
MAPS_2 = ([0, 1, 1, 0], [0, 1, 0, 1], [1, 0, 0, 1])  # after step 3 (B only)
MAPS_4 = (([3, 2, 1, 0, 0, 1, 2, 3], [1, 1, 0, 0, 3, 3, 2, 2], [2, 3, 0, 1, 2, 3, 0, 1]),  # 4 ranks, 8 experts:
          ([3, 2, 0, 1, 1, 0, 2, 3], [0, 2, 1, 3, 0, 2, 1, 3], [1, 0, 1, 0, 3, 2, 3, 2]))  # all ranks exchange,
# then layer 0 only between ranks 0 and 1


def _worker(out: Path) -> None:
    import torch

    rank, world = deepspeed_world()
    from moeload.act.deepspeed import expert_to_rank, permute_experts
    from moeload.act.permute import phy2log

    n_exp, L = 2 * world, 2
    maps_1, maps_2 = (MAPS_1, MAPS_2) if world == 2 else MAPS_4

    def engine() -> object:
        torch.manual_seed(0)  # the same weights on both ranks and in A, B, C
        return deepspeed_engine(DeepSpeedNet(H, n_exp, world, ((1, False), (2, False), (1, True))))

    gen = torch.Generator().manual_seed(1000 + rank)  # different tokens on each rank
    xs = [torch.randn(1, TOKENS, H, generator=gen) for _ in range(STEPS)]
    x_fixed = torch.randn(1, TOKENS, H, generator=gen)

    def step(eng: object, t: int) -> float:
        torch.manual_seed(10 + t)  # RTS draws from the global generator
        return deepspeed_step(eng, xs[t])

    def logical(eng: object) -> dict:
        """_workers.by_logical, with the gate's rows as "gate_param", "gate_grad", "gate_exp_avg", ..."""
        layers = []
        for m in eng.module.moe:
            e2r = expert_to_rank(m)
            gate = rows(m.deepspeed_moe.gate.wg.weight, eng.optimizer, np.argsort(phy2log(np.asarray(e2r))))
            layers.append((e2r, m.deepspeed_moe.experts.deepspeed_experts, {"gate_" + k: v for k, v in gate.items()}))
        return by_logical(layers, eng.optimizer)

    res: dict = {"rank": rank}
    A, B, C = engine(), engine(), engine()
    res["optimizer"] = type(B.optimizer).__name__
    losses = {"A": [step(A, t) for t in range(STEPS)], "B": [], "C": []}
    for t in range(STEPS):
        if t == 2:
            # (c) invalid maps raise on the calling rank alone, before any communication
            res.update(refusals(permute_experts, expert_to_rank, B.module.moe[0], INVALID, maps_1[0], B))

            # (a) the function is unchanged by a non-trivial permutation
            with torch.no_grad():
                torch.manual_seed(0)
                out_before = B.module(x_fixed)
                counts = B.module.moe[2].deepspeed_moe.exp_counts  # [E] routed, before the capacity cut
                res["dropped"] = int((counts - TOKENS // n_exp).clamp(min=0).sum())
                experts_before = [p.detach().clone() for m in B.module.moe for p in m.deepspeed_moe.experts.parameters()]
                stats = [permute_experts(m, mp, B) for m, mp in zip(B.module.moe, maps_1)]
                torch.manual_seed(0)
                out_after = B.module(x_fixed)
                experts_after = list(p for m in B.module.moe for p in m.deepspeed_moe.experts.parameters())
            res["out"] = [float(out_before), float(out_after)]
            res["experts_changed"] = sum(not torch.equal(a, b) for a, b in zip(experts_before, experts_after))
            res["stats_1"] = stats
            for m, mp in zip(C.module.moe, maps_1):
                permute_experts(m, mp)  # control: without the optimizer
        if t == 3:
            res["stats_2"] = [permute_experts(m, mp, B.optimizer) for m, mp in zip(B.module.moe, maps_2)]
        losses["B"].append(step(B, t))
        losses["C"].append(step(C, t))
    res["losses"] = losses
    res["maps"] = [expert_to_rank(m) for m in B.module.moe]
    res["diff_B"] = max_diff(logical(A), logical(B))
    res["diff_C"] = max_diff(logical(A), logical(C))
    # gradients move too: a backward without a step, then B goes back to the contiguous layout
    for eng in (A, B):
        torch.manual_seed(99)
        eng.backward(eng(xs[0]))
    res["stats_back"] = [permute_experts(m, np.arange(n_exp) // L, B) for m in B.module.moe]
    res["diff_back"] = max_diff(logical(A), logical(B))
    write_result(out, res)


pytest.importorskip("deepspeed")


def _launch(nproc: int, out: Path) -> list[dict]:
    """This file as the worker on `nproc` gloo ranks -> what each rank measured."""
    return launch(__file__, out, nproc=nproc)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return _launch(2, tmp_path_factory.mktemp("ds_permute2"))


@pytest.mark.slow
def test_function_unchanged_by_permutation(ranks):
    for r in ranks:
        assert r["experts_changed"] > 0  # weights really moved on this rank
        np.testing.assert_allclose(r["out"][1], r["out"][0], rtol=1e-6)
        assert r["maps"] == [list(m) for m in MAPS_2]
    assert sum(r["dropped"] for r in ranks) > 0  # layer 2 did drop tokens (capacity 8 per expert)
    s0, s1 = ranks[0]["stats_1"], ranks[1]["stats_1"]
    # layer 0: experts 0 and 3 change rank; layer 1: all four. One expert's params + exp_avg + exp_avg_sq + step.
    n = (H * 2 * H + 2 * H) + (2 * H * H + H)  # one expert's parameters
    per_expert = 4 * (3 * n + 4)  # float32 params, exp_avg, exp_avg_sq, and 4 scalar steps (grads are None)
    assert [s["experts_moved"] for s in s0] == [2, 4, 2]
    assert s0[0]["bytes_sent"] == s0[0]["bytes_received"] == s1[0]["bytes_sent"] > 0
    assert s0[1]["bytes_total"] == 2 * s0[0]["bytes_total"] == 4 * s0[0]["bytes_sent"]
    assert s0[0]["bytes_sent"] == per_expert
    assert all(s["seconds"] > 0 for s in s0 + s1)


@pytest.mark.slow
def test_training_identical_and_optimizer_state_moved(ranks):
    assert [r["optimizer"] for r in ranks] == ["Adam", "Adam"]
    check_training_identical(ranks, {"param", "exp_avg", "exp_avg_sq", "step", "gate_param", "gate_exp_avg"})


@pytest.mark.slow
def test_gradients_move_and_the_contiguous_layout_comes_back(ranks):
    for r in ranks:
        assert {"grad", "gate_grad"} <= set(r["diff_back"])
        assert max(r["diff_back"].values()) <= 1e-6, r["diff_back"]
        # from MAPS_2 back to contiguous: experts 1 and 3 of layer 0, 1 and 2 of layer 1, 0 and 2 of layer 2,
        # each now with its gradient (4 more float32 tensors)
        assert [s["experts_moved"] for s in r["stats_back"]] == [2, 2, 2]
        n = (H * 2 * H + 2 * H) + (2 * H * H + H)
        assert r["stats_back"][0]["bytes_sent"] == 4 * (4 * n + 4)


@pytest.mark.slow
def test_invalid_maps_raise_on_every_rank_before_communication(ranks):
    check_refusals(ranks)


@pytest.mark.slow
def test_four_ranks(tmp_path):
    rs = _launch(4, tmp_path)
    for r in rs:
        assert r["experts_changed"] > 0 and r["out"][1] == pytest.approx(r["out"][0], rel=1e-6)
        la, lb, lc = (np.array(r["losses"][k]) for k in "ABC")
        np.testing.assert_allclose(lb, la, rtol=1e-6, atol=0)
        assert np.abs(lc[3:] - la[3:]).max() > 1e-4 * np.abs(la).max()  # the control parts
        assert max(r["diff_B"].values()) <= 1e-6 and max(r["diff_back"].values()) <= 1e-6
        assert None not in r["errors"] and r["unchanged_after_errors"]
        assert r["maps"] == [list(m) for m in MAPS_4[1]]
    # the second permutation of layer 0 is an exchange between ranks 0 and 1: ranks 2 and 3 send nothing
    assert [r["stats_2"][0]["bytes_sent"] > 0 for r in rs] == [True, True, False, False]


def test_not_a_deepspeed_moe_layer_is_refused_without_communication():
    import torch

    from moeload.act.deepspeed import permute_experts
    from moeload.errors import InputError

    with pytest.raises(InputError, match="expected a deepspeed.moe.layer.MoE, got Linear"):
        permute_experts(torch.nn.Linear(2, 2), [0, 1])


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
