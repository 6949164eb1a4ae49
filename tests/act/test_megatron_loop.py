"""The loop (moeload.act.loop.Replacer) and checkpoints (moeload.act.checkpoint) on real megatron-core
MoELayers (SequentialMLP experts, expert-model-parallel size 2) over 2 gloo ranks, with a real LoadTracer.

This file is also the worker: pytest runs it under `torch.distributed.run`; each rank writes what it saw
to rank<r>.json. The CUDA-only calls megatron makes are shimmed as in tests/tracing/_shims.py. As in
test_loop.py (DeepSpeed): two identical runs of a model whose routers are biased towards experts 0 and 1
(both on rank 0 in the contiguous layout; top-2, the first layer with softmax before top-k); A is traced only; B is traced and has a Replacer checking every
2 steps: at step 2 its plan moves experts 0 and 1 together to rank 1 (no gain: not applied); then a plan
that splits them, applied at step 4; at steps 6 and 8 the plan is the map in force; then a plan of the
wrong size: rank 0's error reaches every rank as one warning, nothing moves. After step 6 both runs save
(torch.save per rank; B with its layout); fresh models then load B's files into the saved layout (R1)
and into the contiguous one (R2), and train steps 7 and 8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

H, TOKENS, STEPS, E, SAVE = 16, 32, 8, 4, 6
BAD, GOOD = [1, 1, 0, 0], [0, 1, 0, 1]


def _worker(out: Path) -> None:
    import datetime
    import warnings

    import torch
    from torch import nn

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tracing"))
    from _shims import megatron_on_cpu

    torch.set_num_threads(1)
    dist = torch.distributed
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state
        from megatron.core.models.gpt import gpt_layer_specs
        from megatron.core.transformer.moe.moe_layer import MoELayer
        from megatron.core.transformer.transformer_config import TransformerConfig

    from moeload import LoadTracer
    from moeload.act.checkpoint import apply_layout, layout_state_dict
    from moeload.act.loop import Replacer, expert_shape
    from moeload.act.megatron import expert_to_rank
    from moeload.advise.cost import Calibration

    L = E // world

    def make_layer(i: int, pre: bool, seed: int) -> MoELayer:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = TransformerConfig(num_layers=2, hidden_size=H, num_attention_heads=2, ffn_hidden_size=2 * H,
                                    num_moe_experts=E, expert_model_parallel_size=world, use_cpu_initialization=True,
                                    params_dtype=torch.float32, add_bias_linear=False, moe_router_topk=2,
                                    moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="aux_loss",
                                    moe_aux_loss_coeff=1e-2, moe_router_pre_softmax=pre)
            spec = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False).submodules.mlp
            layer = MoELayer(config=cfg, submodules=spec.submodules, layer_number=i + 1)
        layer.set_layer_number(i + 1)
        for j, ex in enumerate(layer.experts.local_experts):  # each logical expert its own weights
            g = torch.Generator().manual_seed(seed + 100 * i + rank * L + j)
            with torch.no_grad():
                for p in ex.parameters():
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        with torch.no_grad():  # skewed routing: inputs have mean 1, so experts 0 and 1 win nearly every token
            layer.router.weight[:2] += 1.0
        return layer

    class Net(nn.Module):
        def __init__(self, seed: int) -> None:
            super().__init__()
            torch.manual_seed(seed)  # the same router weights on both ranks
            self.layers = nn.ModuleList(make_layer(i, pre, seed) for i, pre in enumerate((True, False)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for m in self.layers:
                x = x + m(x)[0]
            return x.pow(2).mean()

    def model(seed: int = 0) -> tuple[Net, torch.optim.Optimizer]:
        net = Net(seed)
        return net, torch.optim.Adam(net.parameters(), lr=1e-2)

    gen = torch.Generator().manual_seed(1000 + rank)  # different tokens on each rank
    xs = [torch.randn(TOKENS, 1, H, generator=gen) + 1.0 for _ in range(STEPS)]

    def step(net: Net, opt: torch.optim.Optimizer, t: int) -> float:
        loss = net(xs[t])
        loss.backward()
        for p in net.parameters():  # data-parallel mean of the non-expert (router) gradients
            if getattr(p, "allreduce", True) and p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def save(net: Net, opt: torch.optim.Optimizer, name: str) -> None:
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "layout": layout_state_dict(net)},
                   out / f"{name}_rank{rank}.pt")

    def load(net: Net, opt: torch.optim.Optimizer, name: str) -> dict:
        ck = torch.load(out / f"{name}_rank{rank}.pt", weights_only=False)  # a fresh load per model (test_checkpoint.py)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        return ck

    def diff(net: Net, opt: torch.optim.Optimizer, ref: dict) -> dict:
        d = {"model": max(float((v - ref["model"][k]).abs().max()) for k, v in net.state_dict().items()
                          if isinstance(v, torch.Tensor) and v.is_floating_point())}
        for i, st in opt.state_dict()["state"].items():
            for k, v in st.items():
                d[k] = max(d.get(k, 0.0), float((v - ref["optimizer"]["state"][i][k]).abs().max()))
        return d

    def run(name: str, replace: bool) -> dict:
        net, opt = model()
        tracer = LoadTracer(net, out / name, flush_every=2, fsync=False)
        cal = Calibration(tokens=(0.0, 1e4), seconds=(0.0, 1e-2))  # 1 us per route on the busiest GPU
        rep = Replacer(tracer, [BAD, BAD], optimizer=opt, every=2, horizon=4, window=2, calibration=cal) if replace else None
        losses = []
        with tracer:
            for t in range(STEPS):
                losses.append(step(net, opt, t))
                tracer.step()
                if rep is not None:
                    rep.on_step_end()
                    if tracer.step_count == 2:
                        rep.set_plan([GOOD, GOOD])
                if tracer.step_count == SAVE:
                    save(net, opt, name)
            caught = []
            if rep is not None:  # a plan that does not fit fails on rank 0 only: every rank warns, nothing moves
                rep.set_plan([[0, 1], [0, 1]])
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    rep.check()
        s = expert_shape(net.layers[0], opt)
        return {"losses": losses, "history": [] if rep is None else rep.history,
                "maps": [expert_to_rank(m) for m in net.layers], "warned": [str(w.message) for w in caught],
                "shape": [s.hidden, s.ffn_hidden, s.gated, s.state_bytes_per_param]}

    res: dict = {"rank": rank}
    with megatron_on_cpu():
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
        res["A"], res["B"] = run("a", False), run("b", True)
        (R1, o1), (R2, o2) = model(7), model(7)
        res["stats_R1"] = apply_layout(R1, torch.load(out / f"b_rank{rank}.pt", weights_only=False)["layout"], o1)
        ck = load(R1, o1, "b")
        res["maps_R1"], res["diff_R1"] = [expert_to_rank(m) for m in R1.layers], diff(R1, o1, ck)
        apply_layout(R2, ck["layout"], o2)
        load(R2, o2, "b")
        apply_layout(R2, "contiguous", o2)
        ref = torch.load(out / f"a_rank{rank}.pt", weights_only=False)
        res["maps_R2"], res["diff_R2"] = [expert_to_rank(m) for m in R2.layers], diff(R2, o2, ref)
        res["losses"] = {n: [step(net, opt, t) for t in range(SAVE, STEPS)] for n, net, opt in (("R1", R1, o1),
                                                                                                ("R2", R2, o2))}
        parallel_state.destroy_model_parallel()
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


pytest.importorskip("megatron.core")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tracing"))
    from _shims import free_port

    out = tmp_path_factory.mktemp("mcore_loop")
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return out, [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]


@pytest.mark.slow
def test_replacer_applies_the_plan_that_pays_and_training_is_unchanged(ranks):
    _, rs = ranks
    for r in rs:
        h = r["B"]["history"]
        assert [d["step"] for d in h] == [2, 4, 6, 8, 8]
        assert h[0]["apply"] == {} and set(h[0]["layers"]) == {"0", "1"}
        assert all(v["gain_s"] <= v["cost_s"] for v in h[0]["layers"].values())
        assert h[1]["apply"] == {"0": GOOD, "1": GOOD}
        for v in h[1]["layers"].values():
            assert v["gain_s"] > v["cost_s"] > 0 and v["after_s"] < v["before_s"]
            assert v["experts_moved"] == 2 and v["bytes_total"] > 0 and v["seconds"] > 0
        assert all(d["apply"] == {} and d["why"] == "the plan is the map in force" for d in h[2:4])
        assert "plan[0]: expected 4 entries" in h[4]["error"] and h[4]["apply"] == {}
        assert len(r["B"]["warned"]) == 1 and "re-placement check at step 8 failed on rank 0" in r["B"]["warned"][0]
        assert r["B"]["maps"] == [GOOD, GOOD] and r["A"]["maps"] == [[0, 0, 1, 1]] * 2
        np.testing.assert_allclose(r["B"]["losses"], r["A"]["losses"], rtol=1e-6, atol=0)
        # fc1 [2H, H] and fc2 [H, 2H], no biases; fp32 params with Adam's two moments (+ a scalar step each)
        assert r["B"]["shape"][:3] == [H, 2 * H, False] and r["B"]["shape"][3] == 13
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
    assert (c[:, :, :2].sum(-1) > 0.5 * c.sum(-1)).all()  # the skew (the aux loss wears the second layer's down)
    ga, gb = a.gpu_loads(), b.gpu_loads()
    np.testing.assert_array_equal(gb[:4], ga[:4])
    np.testing.assert_array_equal(gb[4:], np.stack([c[4:, :, 0::2].sum(-1), c[4:, :, 1::2].sum(-1)], -1))
    assert (gb[4:].max(-1) < ga[4:].max(-1)).all()


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
