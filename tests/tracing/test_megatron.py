"""Megatron-core adapter on real `MoELayer` / `TopKRouter` modules (CPU, 1-process gloo group).

The CUDA-only calls megatron makes are shimmed in tests/tracing/_shims.py (see there). Reference
counts come from the test's own router hooks: `routing_map.sum(0)`, and without capacity also the
top-k of the router logits recomputed from the router's input.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("megatron.core")
from _shims import gloo_world_of_one, megatron_on_cpu  # noqa: E402

from moeload import LoadTracer, open_trace  # noqa: E402
from moeload.tracing.adapters import discover  # noqa: E402

H, E, SEQ, B = 16, 4, 8, 2  # tokens per forward: SEQ * B = 16


@pytest.fixture(scope="module")
def mcore():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state
        from megatron.core.models.gpt import gpt_layer_specs
        from megatron.core.transformer.moe.moe_layer import MoELayer
        from megatron.core.transformer.transformer_config import TransformerConfig
    with gloo_world_of_one(), megatron_on_cpu():
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
        try:
            yield TransformerConfig, MoELayer, gpt_layer_specs
        finally:
            parallel_state.destroy_model_parallel()


class Net(nn.Module):
    def __init__(self, mcore, k: int, capacity: float | None, pad: bool = False) -> None:
        super().__init__()
        TransformerConfig, MoELayer, specs = mcore
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = TransformerConfig(
                num_layers=2, hidden_size=H, num_attention_heads=2, ffn_hidden_size=32, num_moe_experts=E,
                moe_router_topk=k, moe_token_dispatcher_type="allgather", moe_aux_loss_coeff=1e-2,
                moe_router_load_balancing_type="aux_loss", moe_expert_capacity_factor=capacity,
                moe_pad_expert_input_to_capacity=pad, moe_router_pre_softmax=k == 1, add_bias_linear=False, use_cpu_initialization=True,
            )
            mlp = specs.get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False).submodules.mlp
            if callable(mlp) and not hasattr(mlp, "submodules"):  # >= 0.19: functools.partial(MoELayer, ...)
                make = lambda i: mlp(config=cfg, layer_number=i)  # noqa: E731
            else:
                make = lambda i: MoELayer(config=cfg, submodules=mlp.submodules, layer_number=i)  # noqa: E731
            self.layers = nn.ModuleList([make(1), make(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x)[0])
        return x.pow(2).mean()


def hook_reference(model: Net) -> tuple[list, list, list]:
    """The test's own hooks, per router forward [E]: routing_map.sum(0); the top-k of the router
    logits recomputed from its input; routes both in that top-k and in the map (kept routes)."""
    maps, topk, kept = ([[] for _ in model.layers] for _ in range(3))
    for i, layer in enumerate(model.layers):
        sel = {}

        def pre(m, a, i=i, sel=sel):
            logits = a[0].reshape(-1, H).float() @ m.weight.float().t()
            idx = logits.topk(m.config.moe_router_topk, dim=-1).indices
            sel["mask"] = torch.zeros(logits.shape, dtype=torch.bool).scatter_(1, idx, True)
            topk[i].append(np.bincount(idx.reshape(-1).numpy(), minlength=E))

        def post(m, a, o, i=i, sel=sel):
            maps[i].append(o[1].sum(0).numpy().astype(np.int64))
            kept[i].append((o[1] & sel["mask"]).sum(0).numpy().astype(np.int64))

        layer.router.register_forward_pre_hook(pre)
        layer.router.register_forward_hook(post)
    return maps, topk, kept


def run(model: Net, tracer: LoadTracer, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    refs = hook_reference(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        model(torch.randn(SEQ, B, H, generator=gen)).backward()
        opt.step()
        opt.zero_grad()
        tracer.step()
        out.append([[v.pop() for v in ref] for ref in refs])
    return tuple(np.array([o[j] for o in out]) for j in range(3))


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("capacity,pad", [(None, False), (0.5, False), (0.5, True)])
def test_moe_layer_counts(mcore, tmp_path, k, capacity, pad):
    torch.manual_seed(k)
    model = Net(mcore, k, capacity, pad)
    with LoadTracer(model, tmp_path / "t", flush_every=2) as tr:
        ref_map, ref_topk, ref_kept = run(model, tr, steps=3)
    t = open_trace(tmp_path / "t")
    assert t.layers == ["layers.0.router", "layers.1.router"]
    assert t.meta["framework"] == "megatron-core" and t.meta["top_k"] == [k, k]
    c = t.counts()
    assert (t.tokens() == SEQ * B).all()
    if capacity is None:
        np.testing.assert_array_equal(c, ref_map)
        np.testing.assert_array_equal(c, ref_topk)  # the map is the top-k of the logits
        assert (c.sum(-1) == SEQ * B * k).all()
    else:
        # the router drops before returning: the trace holds kept counts, capacity-bounded
        cap = int(np.ceil(SEQ * B * k / E * capacity))
        assert (c <= cap).all() and (c.sum(-1) < SEQ * B * k).all()
        np.testing.assert_array_equal(c, ref_kept)
        if not pad:
            np.testing.assert_array_equal(c, ref_map)
        else:  # the padded map marks every capacity slot; the trace counts real routes only
            assert (ref_map == cap).all() and (c <= ref_map).all()


def test_discovery_reads_ep_layout_and_count_kind(mcore):
    model = Net(mcore, 2, 0.5)
    specs = discover(model)
    assert [s.name for s in specs] == ["layers.0.router", "layers.1.router"]
    assert all(s.num_experts == E and s.top_k == 2 and s.ep_size == 1 and s.ep_rank == 0 for s in specs)
    assert all(s.count_kind == "kept" for s in specs)
    assert all(s.count_kind == "routed" for s in discover(Net(mcore, 2, None)))
