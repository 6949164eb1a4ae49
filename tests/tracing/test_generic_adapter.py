"""Generic adapter and sync-free accumulation: every routing form, selection by pattern and type, hook faults."""

from __future__ import annotations

import json
import warnings
from typing import NamedTuple

import numpy as np
import pytest
import torch
from _loop import sgd
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from moeload import LoadTracer, open_trace
from moeload.errors import InputError
from moeload.tracing import GenericAdapter, Routing, discover
from moeload.tracing.accumulate import accumulate

E, K, H = 4, 2, 8


class Routed(NamedTuple):
    scores: torch.Tensor
    selected_experts: torch.Tensor


class IndexRouter(nn.Module):
    """Linear gate + top-k; returns (scores, indices) as a NamedTuple, ids >= `drop_from` set to -1."""

    def __init__(self, drop_from: int = E) -> None:
        super().__init__()
        self.wg = nn.Linear(H, E, bias=False)
        self.k = K
        self.drop_from = drop_from

    def forward(self, x: torch.Tensor) -> Routed:
        scores, idx = self.wg(x).softmax(-1).topk(K, -1)
        return Routed(scores, torch.where(idx >= self.drop_from, -1, idx))


class MaskGate(nn.Module):
    """Returns a dict with a [T, E] bool routing map (top-1 + every token to expert 0)."""

    num_experts = E
    top_k = 2

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(H, E)

    def forward(self, x: torch.Tensor) -> dict:
        logits = self.proj(x)
        mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.argmax(-1, keepdim=True), True)
        mask[:, 0] = True
        return {"logits": logits, "routing_map": mask}


class CountsGate(nn.Module):
    """Returns precomputed per-expert counts [E] (like DeepSpeed's exp_counts), top-1."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(H, E)
        self.top_k = 1

    def forward(self, x: torch.Tensor) -> Routing:
        idx = self.gate(x).argmax(-1)
        return Routing(counts=torch.zeros(E, dtype=torch.int64).index_add_(0, idx, torch.ones_like(idx)))


class FaultyRouter(IndexRouter):
    """A FAKE FAULT (a hook failure we cannot cause otherwise): its 3rd training forward (step 3)
    returns a malformed output ([1, T, k] indices), which the tracer's hook cannot read."""

    def __init__(self) -> None:
        super().__init__()
        self.train_calls = 0

    def forward(self, x: torch.Tensor):
        self.train_calls += self.training
        out = super().forward(x)
        return out.selected_experts[None] if self.train_calls == 3 and self.training else out


class Net(nn.Module):
    def __init__(self, *gates: nn.Module) -> None:
        super().__init__()
        self.inp = nn.Linear(H, H)
        self.gates = nn.ModuleList(gates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        loss = h.pow(2).mean()
        for g in self.gates:
            g(h)
            loss = loss + sum(p.sum() for p in g.parameters()) * 0
        return loss


def own_counts(model: Net, x: torch.Tensor) -> np.ndarray:
    """[L, E] routed counts of one forward, recomputed here from each gate's own output with numpy."""
    h = model.inp(x).detach()
    out = []
    for g in model.gates:
        o = g(h)
        if isinstance(o, Routed):
            idx = o.selected_experts.numpy().ravel()
            out.append(np.bincount(idx[idx >= 0], minlength=E))
        elif isinstance(o, dict):
            out.append(o["routing_map"].numpy().sum(0))
        else:
            out.append(o.counts.numpy())
    return np.stack(out)


def run(model: Net, tracer: LoadTracer, steps: int, seed: int = 0) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    ref = []
    for _ in range(steps):
        x = torch.randn(16, H, generator=gen)
        with torch.no_grad():
            model.eval()
            ref.append(own_counts(model, x))
            model.train()
        model(x).backward()
        sgd(model, lr=0.1)
        tracer.step()
    return np.stack(ref)


def test_generic_by_pattern_and_type_all_routing_forms(tmp_path):
    torch.manual_seed(0)
    model = Net(IndexRouter(drop_from=3), MaskGate(), CountsGate())
    with LoadTracer(model, tmp_path / "t", gates=["gates.0", "*.2"], gate_types=(MaskGate,), flush_every=2) as tr:
        ref = run(model, tr, 5)
    assert tr.layers == ["gates.0", "gates.1", "gates.2"]
    t = open_trace(tmp_path / "t")
    assert t.meta["framework"] == "torch" and t.top_k == [2, 2, 1]
    np.testing.assert_array_equal(t.counts(), ref)
    assert ref[:, 0, 3].sum() == 0 and t.counts()[:, 0].sum(-1).min() < 16 * K  # -1 = no expert
    np.testing.assert_array_equal(t.tokens(), np.full((5, 3), 16))  # tokens: T (indices, map), sum // k (counts)


def test_generic_needs_num_experts_when_module_does_not_tell(tmp_path):
    class Opaque(nn.Module):
        top_k = 1

        def forward(self, x):
            return x.argmax(-1, keepdim=True)

    model = Net(Opaque())
    with pytest.raises(InputError, match="num_experts"):
        LoadTracer(model, tmp_path / "t", gates="gates.*")
    tr = LoadTracer(model, tmp_path / "t", gates="gates.*", num_experts=H)
    assert tr.specs[0].num_experts == H


def test_hook_error_disables_layer_warns_once_and_training_continues(tmp_path):
    torch.manual_seed(0)
    model = Net(FaultyRouter(), IndexRouter())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with LoadTracer(model, tmp_path / "t", gate_types=(IndexRouter,), flush_every=3) as tr:
            ref = run(model, tr, 6)
    msgs = [str(x.message) for x in w if "disabled" in str(x.message)]
    assert len(msgs) == 1 and "gates.0" in msgs[0] and "RoutingShapeError" in msgs[0]
    assert tr.disabled_layers == ["gates.0"] and tr.step_count == 6
    t = open_trace(tmp_path / "t")
    c = t.counts()
    np.testing.assert_array_equal(c[:, 1], ref[:, 1])  # the healthy layer: every step
    np.testing.assert_array_equal(c[:2, 0], ref[:2, 0])  # the faulty layer: counted before the fault
    assert (c[2:, 0] == 0).all()
    meta = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert "gates.0" in meta["extra"]["hook_errors"]
    assert meta["extra"]["disabled_layers"]["gates.0"] == {"step": 2, "ranks": [0], "reason": "unexpected router output shape"}


def test_discover_orders_by_module_and_first_adapter_wins():
    a, b = IndexRouter(), IndexRouter()
    model = Net(a, b)
    specs = discover(model, [GenericAdapter(["gates.1"], top_k=1), GenericAdapter(types=(IndexRouter,))])
    assert [(s.name, s.top_k) for s in specs] == [("gates.0", 2), ("gates.1", 1)]


@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(0, 40),
    k=st.integers(1, 3),
    E=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_accumulate_matches_numpy(T, k, E, seed):
    rng = np.random.default_rng(seed)
    idx = rng.integers(-1, E, size=(T, k))
    kept = rng.random((T, k)) < 0.7
    W = E + 4
    routed_row, kept_row = torch.zeros(W, dtype=torch.int64), torch.zeros(W, dtype=torch.int64)
    accumulate(Routing(indices=torch.from_numpy(idx), kept=torch.from_numpy(kept)), routed_row, kept_row, E, k)
    ok = idx >= 0
    np.testing.assert_array_equal(routed_row[1 : E + 1].numpy(), np.bincount(idx[ok], minlength=E))
    np.testing.assert_array_equal(kept_row[1 : E + 1].numpy(), np.bincount(idx[ok & kept], minlength=E))
    assert routed_row[0] == (~ok).sum() and routed_row[-1] == T
    mask = torch.from_numpy(rng.random((T, E)) < 0.3)
    before = routed_row.clone()
    accumulate(mask, routed_row, None, E, k)
    np.testing.assert_array_equal((routed_row - before)[1 : E + 1].numpy(), mask.numpy().sum(0))


def test_accumulate_rejects_malformed_routing_before_touching_rows():
    row = torch.zeros(7, dtype=torch.int64)
    for bad in (torch.zeros(2, 3, 4, dtype=torch.int64), torch.zeros(3, 5, dtype=torch.bool), torch.zeros(3)):
        with pytest.raises(ValueError):
            accumulate(bad, row, row, 4, 2)
    with pytest.raises(ValueError, match="kept"):
        accumulate(Routing(indices=torch.zeros(3, 2, dtype=torch.int64), kept=torch.ones(3, dtype=torch.bool)), row, row, 4, 2)
    assert row.sum() == 0
