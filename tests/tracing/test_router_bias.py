"""Expert-bias (aux-loss-free) routers: the bias each step routed with is recorded (`Trace.router_bias()`),
for a torchtitan-style MoE (bias buffer on the router's parent, DeepSeek-V3 sign update after the
optimizer step), megatron-core's TopKRouter with moe_router_enable_expert_bias, and on 2 gloo ranks.
"""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from moeload import LoadTracer, open_trace

E, K, D = 8, 2, 16


class Router(nn.Module):
    """torchtitan-style: sigmoid scores, top-k of scores + the parent's expert_bias; returns
    (top-k weights, top-k indices, counts)."""

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.num_experts, self.top_k = E, K
        self._moe = [moe]  # not a submodule

    def forward(self, x):
        scores = torch.sigmoid(self.gate(x))
        idx = (scores + self._moe[0].expert_bias).topk(K, dim=-1).indices
        return scores.gather(-1, idx), idx


class MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = Router(self)
        self.register_buffer("expert_bias", torch.zeros(E))
        self.register_buffer("tokens_per_expert", torch.zeros(E))

    def forward(self, x):
        w, idx = self.router(x)
        with torch.no_grad():
            self.tokens_per_expert += torch.bincount(idx.flatten(), minlength=E).float()
        return x * w.sum(-1, keepdim=True)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([MoE() for _ in range(2)])

    def forward(self, x):
        for m in self.layers:
            x = m(x)
        return x


def update_bias(model: Model, rate: float = 0.05) -> None:
    """DeepSeek-V3: bias += rate * sign(mean load - load), after the optimizer step."""
    with torch.no_grad():
        for m in model.layers:
            load = m.tokens_per_expert
            m.expert_bias += rate * torch.sign(load.mean() - load)
            load.zero_()


def test_bias_in_force_at_each_step_is_recorded(tmp_path):
    torch.manual_seed(0)
    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    want, counts = [], []
    tracer = LoadTracer(model, tmp_path / "t", flush_every=4, gates="*.router")
    assert tracer.bias_layers == ["layers.0.router", "layers.1.router"]
    with tracer:
        for _ in range(10):
            want.append(torch.stack([m.expert_bias.clone() for m in model.layers]).numpy())
            x = torch.randn(32, D)
            model(x).pow(2).mean().backward()
            counts.append(np.stack([m.tokens_per_expert.numpy().copy() for m in model.layers]))
            opt.step()
            opt.zero_grad()
            update_bias(model)
            tracer.step()
    t = open_trace(tmp_path / "t")
    b = t.router_bias()
    assert b.shape == (10, 2, E) and b.dtype == np.float64
    np.testing.assert_array_equal(b, np.stack(want).astype(np.float64))
    assert np.abs(b[-1]).sum() > 0  # the bias moved
    np.testing.assert_array_equal(t.counts(), np.stack(counts).astype(np.int64))
    np.testing.assert_array_equal(t.router_bias(steps=slice(3, 7), layers=[1]), b[3:7, [1]])
    assert t.meta["extra"]["router_bias_layers"] == tracer.bias_layers


def test_no_bias_router_gives_none(tmp_path):
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(D, E)

    m = Plain()
    with LoadTracer(m, tmp_path / "t", gates="router", top_k=K) as tr:
        m.router(torch.randn(4, D))
        tr.step()
    assert tr.bias_layers == []
    assert open_trace(tmp_path / "t").router_bias() is None


def test_megatron_topk_router_expert_bias(tmp_path):
    pytest.importorskip("megatron.core")
    from _shims import gloo_world_of_one, megatron_on_cpu

    with gloo_world_of_one(), megatron_on_cpu():
        import warnings

        from megatron.core import parallel_state
        from megatron.core.models.gpt import gpt_layer_specs
        from megatron.core.transformer.moe.moe_layer import MoELayer
        from megatron.core.transformer.transformer_config import TransformerConfig

        parallel_state.initialize_model_parallel(1, 1)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = TransformerConfig(num_layers=1, hidden_size=D, num_attention_heads=2, ffn_hidden_size=32,
                                        num_moe_experts=E, moe_router_topk=K, moe_router_enable_expert_bias=True,
                                        moe_router_score_function="sigmoid", moe_router_load_balancing_type="none",
                                        moe_token_dispatcher_type="allgather", add_bias_linear=False,
                                        use_cpu_initialization=True)
                mlp = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False).submodules.mlp
                layer = MoELayer(config=cfg, submodules=mlp.submodules, layer_number=1)
            model = nn.ModuleDict({"moe": layer})
            router = layer.router
            want = []
            with LoadTracer(model, tmp_path / "t", flush_every=2) as tr:
                assert tr.bias_layers == ["moe.router"]
                for s in range(5):
                    want.append(router.expert_bias.detach().clone().numpy())
                    layer(torch.randn(12, 1, D))
                    with torch.no_grad():  # what megatron's finalize step does, with a visible step size
                        router.expert_bias += 0.01 * (s + 1) * torch.arange(E, dtype=torch.float32)
                    tr.step()
        finally:
            parallel_state.destroy_model_parallel()
    b = open_trace(tmp_path / "t").router_bias()
    np.testing.assert_allclose(b[:, 0], np.stack(want), rtol=0, atol=0)
    assert b[-1, 0, -1] > 0


WORKER = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[3])
    from test_router_bias import Model, update_bias
    from moeload import LoadTracer
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same model on both ranks; different data
    model = Model()
    g = torch.Generator().manual_seed(10 + rank)
    want = []
    with LoadTracer(model, sys.argv[2], flush_every=3, gates="*.router") as tr:
        for s in range(7):
            want.append(torch.stack([m.expert_bias.clone() for m in model.layers]).tolist())
            model(torch.randn(16, 16, generator=g)).sum()
            for m in model.layers:  # the loads all-reduced, as frameworks do before the bias update
                dist.all_reduce(m.tokens_per_expert)
            update_bias(model)
            tr.step()
    if rank == 0:
        open(sys.argv[2] + ".json", "w").write(json.dumps(want))
    dist.barrier()
    dist.destroy_process_group()  # gloo's threads joined before exit (else an abort at interpreter exit)
    """
)


def test_two_ranks_record_the_shared_bias(tmp_path):
    from _shims import run_workers

    run_workers(tmp_path, WORKER, 2, lambda r: [str(tmp_path / "t"), os.path.dirname(os.path.abspath(__file__))])
    want = np.array(json.loads((tmp_path / "t.json").read_text()))
    t = open_trace(tmp_path / "t")
    np.testing.assert_array_equal(t.router_bias(), want)
    assert t.rank_counts().shape[1] == 2 and np.abs(want[-1]).sum() > 0
