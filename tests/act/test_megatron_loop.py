"""The loop (moeload.act.loop.Replacer) and checkpoints (moeload.act.checkpoint) on real megatron-core
MoELayers (SequentialMLP experts, expert-model-parallel size 2) over 2 gloo ranks, with a real LoadTracer.

This file is also the worker: pytest runs it under `torch.distributed.run` (_workers.launch); each rank
writes what it saw to rank<r>.json. The CUDA-only calls megatron makes are shimmed as in
tests/tracing/_shims.py. The scenario and its checks are _workers.py's, as in test_loop.py (DeepSpeed):
two identical runs of a model whose routers are biased towards experts 0 and 1 (both on rank 0 in the
contiguous layout; top-2, the first layer with softmax before top-k); A is traced only; B is traced and
has a Replacer checking every 2 steps: at step 2 its plan moves experts 0 and 1 together to rank 1 (no
gain: not applied); then a plan that splits them, applied at step 4; at steps 6 and 8 the plan is the
map in force; then a plan of the wrong size: rank 0's error reaches every rank as one warning, nothing
moves. After step 6 both runs save (torch.save per rank; B with its layout); fresh models then load B's
files into the saved layout (R1) and into the contiguous one (R2), and train steps 7 and 8.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from _workers import (
    GOOD,
    LOOP_STEPS,
    MegatronNet,
    check_replacer_history,
    check_trace_follows_change,
    launch,
    load_checkpoint,
    megatron_layer,
    megatron_on_cpu,
    megatron_step,
    megatron_world,
    replacer_run,
    save_checkpoint,
    state_diff,
    write_result,
)

H, TOKENS, E, SAVE = 16, 32, 4, 6


def _worker(out: Path) -> None:
    import torch
    import torch.distributed as dist

    rank, _ = megatron_world()
    from megatron.core import parallel_state

    from moeload.act.checkpoint import apply_layout, layout_state_dict
    from moeload.act.loop import expert_shape
    from moeload.act.megatron import expert_to_rank

    def make_layer(i: int, seed: int) -> torch.nn.Module:
        layer = megatron_layer(i, H, E, 2, seed, moe_router_topk=2, moe_token_dispatcher_type="allgather",
                               moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2,
                               moe_router_pre_softmax=i == 0)
        with torch.no_grad():  # skewed routing: inputs have mean 1, so experts 0 and 1 win nearly every token
            layer.router.weight[:2] += 1.0
        return layer

    def model(seed: int = 0) -> tuple[MegatronNet, torch.optim.Optimizer]:
        net = MegatronNet(seed, 2, lambda i: make_layer(i, seed))
        return net, torch.optim.Adam(net.parameters(), lr=1e-2)

    gen = torch.Generator().manual_seed(1000 + rank)  # different tokens on each rank
    xs = [torch.randn(TOKENS, 1, H, generator=gen) + 1.0 for _ in range(LOOP_STEPS)]

    def ckpt(name: str) -> Path:
        return out / f"{name}_rank{rank}.pt"

    def run(name: str, replace: bool) -> dict:
        net, opt = model()

        def save_at(step: int) -> None:
            if step == SAVE:
                save_checkpoint(ckpt(name), net, opt, layout_state_dict(net))

        res = replacer_run(net, opt, lambda t: megatron_step(net, opt, xs[t]), out / name, replace,
                           lambda: [expert_to_rank(m) for m in net.layers], save_at)
        s = expert_shape(net.layers[0], opt)
        return {**res, "shape": [s.hidden, s.ffn_hidden, s.gated, s.state_bytes_per_param]}

    res: dict = {"rank": rank}
    with megatron_on_cpu():
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=dist.get_world_size())
        res["A"], res["B"] = run("a", False), run("b", True)
        (R1, o1), (R2, o2) = model(7), model(7)
        res["stats_R1"] = apply_layout(R1, torch.load(ckpt("b"), weights_only=False)["layout"], o1)
        ck = load_checkpoint(ckpt("b"), R1, o1)
        res["maps_R1"], res["diff_R1"] = [expert_to_rank(m) for m in R1.layers], state_diff(R1, o1, ck)
        apply_layout(R2, ck["layout"], o2)
        load_checkpoint(ckpt("b"), R2, o2)
        apply_layout(R2, "contiguous", o2)
        ref = torch.load(ckpt("a"), weights_only=False)
        res["maps_R2"], res["diff_R2"] = [expert_to_rank(m) for m in R2.layers], state_diff(R2, o2, ref)
        res["losses"] = {n: [megatron_step(net, opt, xs[t]) for t in range(SAVE, LOOP_STEPS)]
                         for n, net, opt in (("R1", R1, o1), ("R2", R2, o2))}
        parallel_state.destroy_model_parallel()
    write_result(out, res)
    dist.destroy_process_group()


pytest.importorskip("megatron.core")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("mcore_loop")
    return out, launch(__file__, out)


@pytest.mark.slow
def test_replacer_applies_the_plan_that_pays_and_training_is_unchanged(ranks):
    _, rs = ranks
    check_replacer_history(rs)
    for r in rs:
        # fc1 [2H, H] and fc2 [H, 2H], no biases; fp32 params with Adam's two moments (+ a scalar step each)
        assert r["B"]["shape"][:3] == [H, 2 * H, False] and r["B"]["shape"][3] == 13


@pytest.mark.slow
def test_the_trace_holds_the_change_and_gpu_loads_follow_it(ranks):
    check_trace_follows_change(ranks[0], skew=0.5)  # the skew (the aux loss wears the second layer's down)


@pytest.mark.slow
def test_a_checkpoint_saved_after_the_replacement_resumes_identically(ranks):
    _, rs = ranks
    for r in rs:
        assert r["maps_R1"] == [GOOD, GOOD] and max(r["diff_R1"].values()) == 0.0
        assert [s["experts_moved"] for s in r["stats_R1"].values()] == [2, 2]
        np.testing.assert_allclose(r["losses"]["R1"], r["B"]["losses"][SAVE:], rtol=1e-6, atol=0)
        # into the contiguous layout: element-wise the unpermuted run's state, and its losses
        assert r["maps_R2"] == [[0, 0, 1, 1]] * 2 and {"model", "exp_avg", "exp_avg_sq", "step"} <= set(r["diff_R2"])
        assert max(r["diff_R2"].values()) <= 1e-6, r["diff_R2"]
        np.testing.assert_allclose(r["losses"]["R2"], r["A"]["losses"][SAVE:], rtol=1e-6, atol=0)


def test_expert_shape_refuses_what_is_not_a_moe_layer():
    import torch

    from moeload.act.loop import expert_shape
    from moeload.errors import InputError

    with pytest.raises(InputError, match="expected a DeepSpeed MoE or megatron-core MoELayer layer, got Linear"):
        expert_shape(torch.nn.Linear(2, 2))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
