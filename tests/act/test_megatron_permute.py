"""permute_experts on real megatron-core MoELayers (SequentialMLP experts), 2 gloo processes on CPU,
expert-model-parallel size 2, 4 experts (2 per rank).

This file is also the worker: pytest runs it under `torch.distributed.run`; each rank writes what it
measured to rank<r>.json and the tests below check it. The CUDA-only calls megatron makes are shimmed
as in tests/tracing/_shims.py (`megatron_on_cpu`). Three identical models (same weights, each expert's
own seed, same per-rank inputs, torch AdamW): A is never permuted; B is permuted after step 2 with its
optimizer; C is permuted after step 2 without it (the control: Adam's moments stay behind, so its
losses must part from A's). All layers use the allgather dispatcher (the alltoall one needs CUDA
streams). Layer 0: top-2 softmax with aux loss; layer 1: sigmoid top-2 with expert bias (non-zero)
and a router bias; layer 2: top-1 with capacity factor 1, dropping by probability, and the global aux
loss (its running token counts per expert are router state too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

H, TOKENS, STEPS, E = 16, 32, 5, 4
MAPS = ([1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0])  # after step 2: layers 0, 1, 2
INVALID = ([0, 1, 1], [0, 0, 0, 1], [0, 1, 2, 1], [0.5, 1, 0, 1], "0011")
LAYERS = (
    dict(moe_router_topk=2, moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="aux_loss",
         moe_aux_loss_coeff=1e-2),
    dict(moe_router_topk=2, moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
         moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True),
    dict(moe_router_topk=1, moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="global_aux_loss",
         moe_aux_loss_coeff=1e-1, moe_router_pre_softmax=True, moe_expert_capacity_factor=1.0,
         moe_token_drop_policy="probs"),
)


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

    from moeload.act.megatron import expert_to_rank, permute_experts
    from moeload.act.permute import phy2log
    from moeload.errors import InputError

    L = E // world

    def make_layer(i: int, **kw: object) -> MoELayer:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = TransformerConfig(num_layers=3, hidden_size=H, num_attention_heads=2, ffn_hidden_size=2 * H,
                                    num_moe_experts=E, expert_model_parallel_size=world, use_cpu_initialization=True, params_dtype=torch.float32,
                                    **{"add_bias_linear": False, **kw})
            spec = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False).submodules.mlp
            layer = MoELayer(config=cfg, submodules=spec.submodules, layer_number=i + 1)
        layer.set_layer_number(i + 1)
        # each logical expert its own weights (CPU init draws the same local experts on every rank)
        for j, ex in enumerate(layer.experts.local_experts):
            g = torch.Generator().manual_seed(100 * i + rank * L + j)
            with torch.no_grad():
                for p in ex.parameters():
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
            # a router bias, as add_bias_linear=True gives (which also gives the experts biases, and
            # megatron 0.16's expert MLP then fails on CPU: in-place add to a custom Function's view)
            layer.router.bias = nn.Parameter(0.1 * torch.randn(E))
        return layer

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)  # the same router weights on both ranks and in A, B, C
            self.layers = nn.ModuleList(make_layer(i, **kw) for i, kw in enumerate(LAYERS))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for m in self.layers:
                x = x + m(x)[0]
            return x.pow(2).mean()

    def model() -> tuple[Net, torch.optim.Optimizer]:
        net = Net()
        return net, torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)

    gen = torch.Generator().manual_seed(1000 + rank)  # different tokens on each rank
    xs = [torch.randn(TOKENS, 1, H, generator=gen) for _ in range(STEPS)]
    x_fixed = torch.randn(TOKENS, 1, H, generator=gen)

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

    def by_logical(net: Net, opt: torch.optim.Optimizer) -> dict:
        """{layer: ({logical expert: {param i: {"param"|"grad"|state key: list}}}, router rows by logical)}."""
        def rows(p: torch.nn.Parameter, inv: np.ndarray) -> dict:
            return {"param": p.detach()[inv].tolist(), **({} if p.grad is None else {"grad": p.grad[inv].tolist()}),
                    **{k: v[inv].tolist() for k, v in opt.state.get(p, {}).items() if v.dim()}}

        mine = {}
        for li, m in enumerate(net.layers):
            p2l = phy2log(np.asarray(expert_to_rank(m)))
            layer = {}
            for j, ex in enumerate(m.experts.local_experts):
                layer[int(p2l[rank * L + j])] = {
                    i: {"param": p.detach().tolist(), **({} if p.grad is None else {"grad": p.grad.tolist()}),
                        **{k: (v.tolist() if v.dim() else float(v)) for k, v in opt.state.get(p, {}).items()}}
                    for i, p in enumerate(ex.parameters())}
            inv = np.argsort(p2l)  # logical -> slot
            r = m.router
            router = {"weight": rows(r.weight, inv)}
            if r.bias is not None:
                router["bias"] = rows(r.bias, inv)
            for name in ("expert_bias", "local_tokens_per_expert", "global_tokens_per_expert"):
                if getattr(r, name, None) is not None:
                    router[name] = {"param": getattr(r, name)[inv].tolist()}
            mine[li] = (layer, router)
        every: list = [None] * world
        dist.all_gather_object(every, mine)
        return {li: ({e: v for r in every for e, v in r[li][0].items()}, every[rank][li][1]) for li in mine}

    def max_diff(a: dict, b: dict) -> dict:
        d: dict = {}
        for li in a:
            for e in a[li][0]:
                for i in a[li][0][e]:
                    for k, v in a[li][0][e][i].items():
                        d[k] = max(d.get(k, 0.0), float(np.abs(np.subtract(v, b[li][0][e][i][k])).max()))
            for name, kinds in a[li][1].items():
                for k, v in kinds.items():
                    key = f"router_{name}_{k}"
                    d[key] = max(d.get(key, 0.0), float(np.abs(np.subtract(v, b[li][1][name][k])).max()))
        return d

    res: dict = {"rank": rank}
    with megatron_on_cpu():
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
        res["ep_size"] = parallel_state.get_expert_model_parallel_world_size()
        (A, oa), (B, ob), (C, oc) = model(), model(), model()
        res["experts_class"] = type(B.layers[0].experts).__name__
        res["same_group"] = B.layers[0].ep_group is parallel_state.get_expert_model_parallel_group()
        losses: dict = {"A": [step(A, oa, t) for t in range(STEPS)], "B": [], "C": []}
        for t in range(STEPS):
            if t == 2:
                # (c) invalid maps raise on the calling rank alone, before any communication: the other
                # rank does not call at all, so a collective inside would hang until the timeout
                layer = B.layers[0]
                before = [p.detach().clone() for p in layer.parameters()]
                errors = []
                for caller in range(world):
                    if rank == caller:
                        for bad in INVALID:
                            try:
                                permute_experts(layer, bad, ob)
                                errors.append(None)
                            except InputError as e:
                                errors.append(str(e))
                    dist.barrier()
                other = torch.optim.Adam(nn.Linear(2, 2).parameters())  # on rank 0 only: shared, both raise
                try:
                    permute_experts(layer, MAPS[0], other if rank == 0 else ob)
                    errors.append(None)
                except InputError as e:
                    errors.append(str(e))
                res["errors"] = errors
                res["unchanged_after_errors"] = all(torch.equal(a, p) for a, p in zip(before, layer.parameters()))
                res["map_after_errors"] = expert_to_rank(layer)

                # (a) the function is unchanged by a non-trivial permutation
                with torch.no_grad():
                    out_before = [B(x_fixed)]
                    experts_before = [p.detach().clone() for m in B.layers for p in m.experts.parameters()]
                    res["stats"] = [permute_experts(m, mp, ob) for m, mp in zip(B.layers, MAPS)]
                    out_before.append(B(x_fixed))
                    experts_after = [p for m in B.layers for p in m.experts.parameters()]
                res["out"] = [float(o) for o in out_before]
                res["experts_changed"] = sum(not torch.equal(a, b) for a, b in zip(experts_before, experts_after))
                for m, mp in zip(C.layers, MAPS):
                    permute_experts(m, mp)  # control: without the optimizer
            losses["B"].append(step(B, ob, t))
            losses["C"].append(step(C, oc, t))
        res["losses"] = losses
        res["maps"] = [expert_to_rank(m) for m in B.layers]
        res["diff_B"] = max_diff(by_logical(A, oa), by_logical(B, ob))
        res["diff_C"] = max_diff(by_logical(A, oa), by_logical(C, oc))
        # gradients move too: a backward without a step, then B goes back to the contiguous layout
        for net in (A, B):
            net(xs[0]).backward()
        res["stats_back"] = [permute_experts(m, np.arange(E) // L, ob) for m in B.layers]
        res["diff_back"] = max_diff(by_logical(A, oa), by_logical(B, ob))
        try:
            grouped = make_layer(0, moe_router_topk=2, moe_router_num_groups=2, moe_router_group_topk=1)
            permute_experts(grouped, MAPS[0])
            res["grouped_error"] = None
        except InputError as e:
            res["grouped_error"] = str(e)
        parallel_state.destroy_model_parallel()
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


pytest.importorskip("megatron.core")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """This file as the worker on 2 gloo ranks -> what each rank measured."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tracing"))
    from _shims import free_port

    out = tmp_path_factory.mktemp("mcore_permute")
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), __file__, str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=root,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]


@pytest.mark.slow
def test_function_unchanged_by_permutation(ranks):
    for r in ranks:
        assert r["ep_size"] == 2 and r["experts_class"] == "SequentialMLP" and r["same_group"]
        assert r["experts_changed"] > 0  # weights really moved on this rank
        np.testing.assert_allclose(r["out"][1], r["out"][0], rtol=1e-6)
        assert r["maps"] == [list(m) for m in MAPS]
    s0, s1 = ranks[0]["stats"], ranks[1]["stats"]
    assert [s["experts_moved"] for s in s0] == [2, 4, 2]
    # one expert's fc1 [2H, H] and fc2 [H, 2H] with exp_avg, exp_avg_sq
    # (float32) and two scalar steps; grads are None at the step boundary
    assert s0[0]["bytes_sent"] == s0[0]["bytes_received"] == s1[0]["bytes_sent"] == 4 * (3 * 4 * H * H + 2)
    assert s0[1]["bytes_total"] == 2 * s0[0]["bytes_total"] == 4 * s0[0]["bytes_sent"]  # all four experts move


@pytest.mark.slow
def test_training_identical_and_optimizer_state_moved(ranks):
    for r in ranks:
        la, lb, lc = (np.array(r["losses"][k]) for k in "ABC")
        np.testing.assert_allclose(lb, la, rtol=1e-6, atol=0)
        assert max(r["diff_B"].values()) <= 1e-6, r["diff_B"]
        assert {"param", "exp_avg", "exp_avg_sq", "step", "router_weight_param", "router_weight_exp_avg",
                "router_bias_exp_avg", "router_expert_bias_param", "router_local_tokens_per_expert_param",
                "router_global_tokens_per_expert_param"} <= set(r["diff_B"])
        # the control: the same up to the first update after its permutation, then apart
        np.testing.assert_allclose(lc[:3], la[:3], rtol=1e-6)
        assert np.abs(lc[3:] - la[3:]).max() > 1e-4 * np.abs(la).max()
        assert r["diff_C"]["exp_avg"] > 1e-4


@pytest.mark.slow
def test_gradients_move_and_the_contiguous_layout_comes_back(ranks):
    for r in ranks:
        assert {"grad", "router_weight_grad", "router_bias_grad"} <= set(r["diff_back"])
        assert max(r["diff_back"].values()) <= 1e-6, r["diff_back"]
        # from MAPS back to contiguous: as many experts as before, each now with its two gradients
        assert [s["experts_moved"] for s in r["stats_back"]] == [2, 4, 2]
        assert r["stats_back"][0]["bytes_sent"] == 4 * (4 * 4 * H * H + 2)


@pytest.mark.slow
def test_invalid_maps_raise_on_every_rank_before_communication(ranks):
    for r in ranks:
        errs = r["errors"]
        assert len(errs) == len(INVALID) + 1 and None not in errs
        assert "expected 4 entries" in errs[0] and "got [3, 1] experts per rank" in errs[1]
        assert "outside [0, 2)" in errs[2] and "integer ranks" in errs[3] and "string" in errs[4]
        assert "does not hold this layer's expert parameters" in errs[5]
        assert r["unchanged_after_errors"] and r["map_after_errors"] == [0, 0, 1, 1]
        assert "group-limited routing (moe_router_num_groups=2)" in r["grouped_error"]


def test_not_a_megatron_moe_layer_is_refused_without_communication():
    import torch

    from moeload.act.megatron import permute_experts
    from moeload.errors import InputError

    with pytest.raises(InputError, match="expected a megatron-core MoELayer, got Linear"):
        permute_experts(torch.nn.Linear(2, 2), [0, 1])


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
