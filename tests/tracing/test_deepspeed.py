"""DeepSpeed adapter on real `deepspeed.moe.layer.MoE` layers (CPU, one process, no torch.distributed).

Reference counts are computed independently in the test: routed = the gate's own top-k recomputed
from the logits of the input the gate saw (a forward pre-hook of the test), kept = the routes the
gate's output leaves in place (indices >= 0, or the dispatch mask).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

deepspeed = pytest.importorskip("deepspeed")
from deepspeed.moe.ep_router import TokenChoiceTopKRouter  # noqa: E402
from deepspeed.moe.layer import MoE  # noqa: E402
from deepspeed.moe.sharded_moe import TopKGate  # noqa: E402

from moeload import LoadTracer, open_trace  # noqa: E402
from moeload.tracing.adapters import discover  # noqa: E402

H, E, B, S = 16, 4, 4, 8  # hidden, experts, batch, sequence: 32 tokens per forward


def reference_routed(gate: TopKGate, x: torch.Tensor) -> np.ndarray:
    """[E] routes per expert before capacity, recomputed from the gate's logits (no noise, no sampling)."""
    logits = torch.nn.functional.linear(x.float(), gate.wg.weight.float())
    gates = logits.softmax(1)
    if gate.k == 1:
        idx = gates.argmax(1, keepdim=True)
    elif gate.k == 2:  # top2_2nd_expert_sampling=False: second = argmax of the logits without the first
        first = gates.argmax(1)
        second = logits.scatter(1, first[:, None], float("-inf")).argmax(1)
        idx = torch.stack([first, second], 1)
    else:
        idx = gates.topk(gate.k, dim=1).indices
    return np.bincount(idx.reshape(-1).numpy(), minlength=E)


class Recorder:
    """The test's own hooks on every TopKGate: per forward, reference routed and kept [E]."""

    def __init__(self, model: nn.Module) -> None:
        self.gates = [m for m in model.modules() if isinstance(m, TopKGate)]
        self.routed = [[] for _ in self.gates]
        self.kept = [[] for _ in self.gates]
        for i, g in enumerate(self.gates):
            g.register_forward_pre_hook(lambda m, a, i=i: self.routed[i].append(reference_routed(m, a[0].detach())))
            g.register_forward_hook(lambda m, a, o, i=i: self.kept[i].append(self._kept(o)))

    @staticmethod
    def _kept(out) -> np.ndarray:
        if len(out) == 7:
            idx = out[3].reshape(-1).numpy()
            return np.bincount(idx[idx >= 0], minlength=E)
        return out[2].sum((0, 2)).numpy().astype(np.int64)

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """-> routed, kept [L, E] summed over the forwards since the last call."""
        r = np.stack([np.sum(v, 0) for v in self.routed])
        k = np.stack([np.sum(v, 0) for v in self.kept])
        for v in (*self.routed, *self.kept):
            v.clear()
        return r, k


class Net(nn.Module):
    def __init__(self, k: int, drop: bool, ep_size: int = 1) -> None:
        super().__init__()
        kw = dict(num_experts=E, ep_size=ep_size, k=k, capacity_factor=0.5, min_capacity=1, drop_tokens=drop,
                  top2_2nd_expert_sampling=False)
        self.moe1 = MoE(H, nn.Linear(H, H), **kw)
        self.moe2 = MoE(H, nn.Linear(H, H), **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, l1, _ = self.moe1(x)
        h, l2, _ = self.moe2(torch.tanh(h))
        return h.pow(2).mean() + 0.01 * (l1 + l2)


def train(model: nn.Module, rec: Recorder, tracer: LoadTracer, steps: int, micro: int = 1):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        for _ in range(micro):
            model(torch.randn(B, S, H, generator=gen)).backward()
        opt.step()
        opt.zero_grad()
        tracer.step()
        out.append(rec.take())
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("drop", [True, False])
def test_moe_layers_routed_and_kept(tmp_path, k, drop):
    torch.manual_seed(k)
    model = Net(k, drop)
    rec = Recorder(model)
    with LoadTracer(model, tmp_path / "t", flush_every=2) as tr:
        ref_r, ref_k = train(model, rec, tr, steps=3, micro=2 if k == 2 else 1)
    t = open_trace(tmp_path / "t")
    assert t.layers == ["moe1.deepspeed_moe.gate", "moe2.deepspeed_moe.gate"]
    assert t.meta["framework"] == "deepspeed" and t.meta["top_k"] == [k, k]
    assert t.steps.tolist() == [0, 1, 2]
    routed = t.counts()
    np.testing.assert_array_equal(routed, ref_r)
    micro = 2 if k == 2 else 1
    assert (routed.sum(-1) == B * S * k * micro).all()  # conservation before dropping
    assert (t.tokens() == B * S * micro).all()
    if drop:
        assert t.meta["count_kind"] == "both"
        kept = t.counts(kind="kept")
        np.testing.assert_array_equal(kept, ref_k)
        assert (kept <= routed).all() and (kept.sum(-1) < routed.sum(-1)).all()  # capacity 0.5 drops
    else:
        assert t.meta["count_kind"] == "routed"
        np.testing.assert_array_equal(ref_k, ref_r)  # nothing dropped: the trace's routed = kept


def test_dense_gate_output(tmp_path):
    """A TopKGate called directly (sparse_routes=False) returns the 4-item form with a dispatch mask."""

    class Direct(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = TopKGate(H, E, k=2, capacity_factor=0.5, min_capacity=1, top2_2nd_expert_sampling=False)

        def forward(self, x):
            l_aux, combine, dispatch, counts = self.gate(x)
            return l_aux + combine.sum()

    torch.manual_seed(0)
    model = Direct()
    rec = Recorder(model)
    with LoadTracer(model, tmp_path / "d", flush_every=4) as tr:
        gen = torch.Generator().manual_seed(0)
        refs = []
        for _ in range(3):
            model(torch.randn(B * S, H, generator=gen)).backward()
            tr.step()
            refs.append(rec.take())
    t = open_trace(tmp_path / "d")
    np.testing.assert_array_equal(t.counts(), np.stack([r[0] for r in refs]))
    np.testing.assert_array_equal(t.counts(kind="kept"), np.stack([r[1] for r in refs]))
    assert (t.counts(kind="kept").sum(-1) < B * S * 2).all()


def test_expert_parallel_placement_and_discovery():
    """ep_size from the layer: expert e on EP rank e // num_local_experts (no process group needed to read it)."""
    model = Net(k=2, drop=True, ep_size=2)
    specs = discover(model)
    assert [s.name for s in specs] == ["moe1.deepspeed_moe.gate", "moe2.deepspeed_moe.gate"]
    assert all(s.ep_size == 2 and s.expert_to_rank == [0, 0, 1, 1] and s.has_kept for s in specs)
    assert all(s.framework_version == deepspeed.__version__ for s in specs)


def test_autoep_router(tmp_path):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = TokenChoiceTopKRouter(H, E, None, None, top_k=2, score_func="softmax",
                                                route_norm=True, route_scale=1.0, gate_bias=False)

        def forward(self, x):
            scores, idx, counts = self.router(x)
            return scores.sum()

    torch.manual_seed(0)
    model = Block()
    seen = []
    model.router.register_forward_hook(lambda m, a, o: seen.append(np.bincount(o[1].reshape(-1).numpy(), minlength=E)))
    with LoadTracer(model, tmp_path / "a", flush_every=8) as tr:
        for _ in range(3):
            model(torch.randn(B * S, H)).backward()
            tr.step()
    t = open_trace(tmp_path / "a")
    assert t.layers == ["router"] and t.meta["count_kind"] == "routed"
    np.testing.assert_array_equal(t.counts()[:, 0], np.stack(seen))
    assert (t.counts().sum(-1) == B * S * 2).all()
