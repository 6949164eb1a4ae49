"""The hook's launch budget per gate forward in steady state, counted on CPU with real gates: the aten
operations a traced forward dispatches beyond the same forward untraced. Kernels (anything but a view)
are what a GPU launches; views launch nothing but cost host time, so the steady state may build at most
the one that flattens the indices. Counts stay exact on the fast path and on the paths it hands over to
(another index dtype mid-run, micro-batch rows, flushes that reuse the rows' slots).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from _models import SigmoidTopKRouter
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moeload import LoadTracer, open_trace
from moeload.tracing.adapters import Routing
from moeload.tracing.adapters.generic import _TupleReader, parse_output
from moeload.workloads.model import BiasRouter, TopKRouter

VIEWS = {
    "view",
    "_unsafe_view",
    "slice",
    "select",
    "reshape",
    "alias",
    "as_strided",
    "narrow",
    "expand",
    "t",
    "transpose",
    "unsqueeze",
    "squeeze",
    "detach",
    "lift_fresh",
    "_reshape_alias",
    "flatten",
}
SYNCS = {"_local_scalar_dense", "item", "nonzero", "bincount", "masked_select", "tolist"}


class Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def ops_of(fn) -> Counter:
    with torch.no_grad(), Ops() as c:
        fn()
    return Counter(c.ops)


def hook_ops(gate: nn.Module, forward, bare: Counter) -> tuple[list[str], list[str]]:
    """(kernels, views) that the tracer's hook added to one forward of `gate` (a later one in the step)."""
    traced = ops_of(forward)
    assert not bare - traced, "the traced forward lost operations of the untraced one"
    extra = traced - bare
    kernels = sorted(o for o in extra.elements() if o.rstrip("_") not in VIEWS)
    views = sorted(o for o in extra.elements() if o.rstrip("_") in VIEWS)
    return kernels, views


def steady(model: nn.Module, gate: nn.Module, forward, tmp_path, **kw) -> tuple[list[str], list[str], list[str]]:
    """Trace `model`, run `forward` to warm up and open a step; -> (kernels, views) of a later forward of
    the step, and the kernels of the step's first forward (which also checks for NaN)."""
    bare = ops_of(forward)
    tracer = LoadTracer(model, tmp_path / "t", flush_every=8, **kw).start()
    forward()  # warm-up: the tracer's device constants (bin boundaries, ones) are made at the first forward
    tracer.step()
    first, _ = hook_ops(gate, forward, bare)
    kernels, views = hook_ops(gate, forward, bare)
    tracer.step()
    tracer.close()
    return kernels, views, first


@pytest.mark.parametrize("cls", [TopKRouter, BiasRouter])
def test_workload_router_one_kernel_no_views_no_sync(tmp_path, cls):
    """The workload's routers give ids in [0, E) by construction (GateSpec.ids_in_range): one index_add_."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"router": cls(32, 8, 2)})
    x = torch.randn(64, 32)
    kernels, views, first = steady(model, model["router"], lambda: model["router"](x), tmp_path)
    assert kernels == ["index_add_"], kernels
    assert len(views) <= 1, views  # the flattened indices; the rows' views are made once per step
    assert first == ["index_add_", "sum"], first  # the NaN check: one sum, folded into the slot at step()
    assert not SYNCS & set(kernels + first)
    out = model["router"](x)  # the same input each forward: 1 forward in step 0 (warm-up), 2 in step 1
    want = np.array([[1], [2]]) * np.bincount(out.indices.reshape(-1).numpy(), minlength=8)
    np.testing.assert_array_equal(open_trace(tmp_path / "t").counts()[:, 0], want)


def test_router_subclass_is_binned(tmp_path):
    """A subclass may route elsewhere (act's ReplicaRouter routes to slots): its ids are binned (two
    kernels), so an id out of range lands in the out-of-range bin instead of failing the hook."""

    class Shifted(TopKRouter):
        def forward(self, x):
            out = super().forward(x)
            return out._replace(indices=out.indices + 6)  # ids 6..13 of 8 experts

    model = nn.ModuleDict({"router": Shifted(32, 8, 2)})
    x = torch.randn(64, 32)
    with pytest.warns(RuntimeWarning, match="expert ids >= 8"):  # the out-of-range bin, flagged at the flush
        kernels, _, _ = steady(model, model["router"], lambda: model["router"](x), tmp_path)
    assert kernels == ["bucketize", "index_add_"], kernels
    t = open_trace(tmp_path / "t")
    out = model["router"](x)
    ids = out.indices.reshape(-1).numpy()
    np.testing.assert_array_equal(t.counts()[:, 0, 6:], np.array([[1], [2]]) * np.bincount(ids, minlength=14)[6:8])


@pytest.mark.parametrize("cls", [TopKRouter, BiasRouter])
def test_workload_router_with_capacity_two_kernels(tmp_path, cls):
    """Routed and kept counts from the router's own per-expert counts and its capacity (kept = min(counts, C),
    Routing.capacity): one minimum against the cached caps and one add_ into both rows, no view."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"router": cls(32, 8, 2, capacity_factor=0.5)})
    x = torch.randn(64, 32)
    kernels, views, _ = steady(model, model["router"], lambda: model["router"](x), tmp_path)
    assert kernels == ["add_", "minimum"], kernels
    assert views == [], views
    out = model["router"](x)  # the same input each forward: 1 forward in step 0 (warm-up), 2 in step 1
    idx, kept = out.indices.reshape(-1).numpy(), out.kept.reshape(-1).numpy()
    t = open_trace(tmp_path / "t")
    assert 0 < kept.sum() < kept.size  # the capacity drops some routes
    n = np.array([[1], [2]])
    np.testing.assert_array_equal(t.counts(kind="kept")[:, 0], n * np.bincount(idx[kept], minlength=8))
    np.testing.assert_array_equal(t.counts()[:, 0], n * np.bincount(idx, minlength=8))


@pytest.mark.parametrize("cls", [TopKRouter, BiasRouter])
@pytest.mark.parametrize("factor", [0.5, 1.25])
def test_workload_capacity_counts_equal_the_kept_mask(tmp_path, cls, factor):
    """min(counts, C) is exact for the workload routers: over random batches of varying size, 1-3 forwards
    a step, the traced kept counts equal the router's own kept mask binned, and routed its indices."""
    gen = torch.Generator().manual_seed(int(10 * factor) + (cls is BiasRouter))
    torch.manual_seed(int(10 * factor))
    model = nn.ModuleDict({"router": cls(16, 6, 2, capacity_factor=factor)})
    want_routed, want_kept = [], []
    with LoadTracer(model, tmp_path / "t", flush_every=5) as tr:
        for _ in range(20):
            routed, kept = np.zeros(6, np.int64), np.zeros(6, np.int64)
            for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
                x = torch.randn(int(torch.randint(8, 97, (1,), generator=gen)), 16, generator=gen)
                out = model["router"](x)
                idx, keep = out.indices.reshape(-1).numpy(), out.kept.reshape(-1).numpy()
                routed += np.bincount(idx, minlength=6)
                kept += np.bincount(idx[keep], minlength=6)
            tr.step()
            want_routed.append(routed)
            want_kept.append(kept)
    t = open_trace(tmp_path / "t")
    np.testing.assert_array_equal(t.counts()[:, 0], want_routed)
    np.testing.assert_array_equal(t.counts(kind="kept")[:, 0], want_kept)
    assert (np.array(want_kept) < np.array(want_routed)).any(), "the capacity drops routes"


def test_generic_tuple_router_two_kernels(tmp_path):
    model = nn.ModuleDict({"router": SigmoidTopKRouter(16, 8, 2)})
    x = torch.randn(32, 16)
    kernels, views, _ = steady(model, model["router"], lambda: model["router"](x), tmp_path, gates="router")
    assert kernels == ["bucketize", "index_add_"], kernels
    assert len(views) <= 1, views


DS_KERNELS = [  # (k, use_rts, drop_tokens, sparse routes?) -> the hook's kernels per forward
    ((2, True, False, True), ["add_"]),
    ((2, True, True, True), ["add_", "minimum"]),  # kept = min(exp_counts, C): both rows in one add_
    ((2, True, True, False), ["add_", "minimum"]),  # the dense form: C = dispatch_mask.shape[2]
    ((1, False, True, True), ["add_", "minimum"]),
    ((1, True, True, True), ["add_", "bucketize", "index_add_"]),  # RTS: the kept ids are binned
]


@pytest.mark.parametrize(("cfg", "want"), DS_KERNELS, ids=[str(c) for c, _ in DS_KERNELS])
def test_deepspeed_gate_kernels(tmp_path, cfg, want):
    """exp_counts go into the routed row in one add_; with drop_tokens, where DeepSpeed keeps exactly
    min(exp_counts, C) routes per expert (top-2, top-1 without RTS) both rows take minimum + add_ (two
    kernels; it was 11, then 3); top-1 with RTS bins the kept routes' ids (bucketize + index_add_)."""
    pytest.importorskip("deepspeed")
    from deepspeed.moe.layer import MoE

    k, rts, drop, sparse = cfg
    torch.manual_seed(0)
    model = MoE(16, nn.Linear(16, 16), num_experts=4, k=k, capacity_factor=0.5, drop_tokens=drop, use_rts=rts)
    gate = model.deepspeed_moe.gate
    seen: list[tuple] = []
    h = gate.register_forward_hook(lambda m, a, o: seen.append((a, o)))
    x = torch.randn(2, 16, 16)
    model(x) if sparse else gate(x.reshape(-1, 16))
    h.remove()
    (inputs, out) = seen[0]
    assert len(out) == (7 if sparse else 4)
    model.train()
    bare = Counter()  # the gate is not run: its hook is called on the recorded output

    def forward() -> None:
        for hook in gate._forward_hooks.values():
            hook(gate, inputs, out)

    tracer = LoadTracer(model, tmp_path / "t", flush_every=8).start()
    forward()
    tracer.step()
    hook_ops(gate, forward, bare)  # the step's first forward
    kernels, views = hook_ops(gate, forward, bare)
    tracer.close()
    assert kernels == want, kernels
    assert len(views) <= (0 if "minimum" in want else 1), views  # the binned path flattens the kept ids
    assert not SYNCS & set(kernels)


DS_EXACT = [(2, True), (1, False), (1, True)]  # (k, use_rts); top-2 has no RTS


@pytest.mark.parametrize("mb", [False, True], ids=["steps", "micro-batches"])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize(("k", "rts"), DS_EXACT, ids=[f"top{k}-rts{int(r)}" for k, r in DS_EXACT])
def test_deepspeed_kept_counts_equal_dispatch(tmp_path, k, rts, sparse, mb):
    """The kept counts the hook records (min(exp_counts, C) where that is used) equal what the real gate
    dispatched, over many random batches of varying size with a capacity tight enough to drop routes:
    dispatch_mask.sum((0, 2)) (gate called on its own) or the sparse routes' indices >= 0 (MoE layer);
    per step; without micro-batch rows (both rows in one [2, E] view of the buffer) and with them (the
    routed row in the micro-batch buffer, the kept row apart)."""
    pytest.importorskip("deepspeed")
    from deepspeed.moe.layer import MoE

    E, H = 8, 16
    torch.manual_seed(k + 2 * rts + 4 * sparse)
    model = MoE(H, nn.Linear(H, H), num_experts=E, k=k, capacity_factor=0.5, min_capacity=1, use_rts=rts)
    gate = model.deepspeed_moe.gate
    kept_of, routed_of = [], []

    def truth(m, a, o) -> None:
        if sparse:
            ids = o[3].reshape(-1).long()
            kept_of.append(np.bincount(ids[ids >= 0].numpy(), minlength=E))
        else:
            kept_of.append(o[2].sum((0, 2)).numpy())
        routed_of.append(o[-1].numpy())

    gate.register_forward_hook(truth)  # before the tracer's: sees the same outputs first
    gen = torch.Generator().manual_seed(7)
    steps, mbs = 12, 3
    with LoadTracer(model, tmp_path / "t", flush_every=5, per_micro_batch=mb) as tr:
        for _ in range(steps):
            for _ in range(mbs):
                T = int(torch.randint(24, 97, (1,), generator=gen))
                x = torch.randn(T, H, generator=gen) * 3
                with torch.no_grad():
                    model(x.view(1, T, H)) if sparse else gate(x)
            tr.step()
    kept, routed = np.stack(kept_of).reshape(steps, mbs, E), np.stack(routed_of).reshape(steps, mbs, E)
    assert (kept < routed).any(axis=-1).all(), "the capacity drops routes in every micro-batch"
    t = open_trace(tmp_path / "t")
    assert not t.meta.get("extra", {}).get("disabled_layers")
    np.testing.assert_array_equal(t.counts(kind="kept")[:, 0], kept.sum(1))
    np.testing.assert_array_equal(t.counts()[:, 0], routed.sum(1))
    if mb:
        np.testing.assert_array_equal(t.micro_batch_counts()[:, :, 0], routed)


def test_counts_exact_across_slots_flushes_and_index_dtypes(tmp_path):
    """The rows' views are remade when the step's slot or the buffer changes; an index dtype seen for the
    first time mid-run goes through the checked path and is then fast too: counts equal a bincount."""

    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_experts, self.top_k, self.dtype = 6, 2, torch.int64

        def forward(self, idx):
            return (idx.to(self.dtype), idx.float())

    model = nn.ModuleDict({"g": Gate()})
    gen = torch.Generator().manual_seed(3)
    want = []
    with LoadTracer(model, tmp_path / "t", gates="g", flush_every=3) as tr:
        for step in range(8):
            model["g"].dtype = torch.int32 if step >= 4 else torch.int64
            c = np.zeros(6, np.int64)
            for _ in range(step % 3 + 1):  # micro-batches
                idx = torch.randint(0, 6, (10, 2), generator=gen)
                model["g"](idx)
                c += np.bincount(idx.reshape(-1).numpy(), minlength=6)
            want.append(c)
            tr.step()
    t = open_trace(tmp_path / "t")
    np.testing.assert_array_equal(t.counts()[:, 0], np.stack(want))
    assert t.tokens()[:, 0].tolist() == [10 * (s % 3 + 1) for s in range(8)]


def test_micro_batch_rows_exact(tmp_path):
    model = nn.ModuleDict({"router": SigmoidTopKRouter(16, 8, 2)})
    got = []
    model["router"].register_forward_hook(
        lambda m, a, o: got.append(np.bincount(o[1].reshape(-1).numpy(), minlength=8))
    )
    with LoadTracer(model, tmp_path / "t", gates="router", flush_every=2, per_micro_batch=True) as tr:
        for _ in range(3):
            for _ in range(2):
                model["router"](torch.randn(12, 16))
            tr.step()
    t = open_trace(tmp_path / "t")
    np.testing.assert_array_equal(t.micro_batch_counts()[:, :, 0], np.stack(got).reshape(3, 2, 8))
    np.testing.assert_array_equal(t.counts()[:, 0], np.stack(got).reshape(3, 2, 8).sum(1))


def test_tuple_reader_matches_parse_output_and_reparses_a_new_signature():
    rd = _TupleReader(8, 2, "auto")
    r = SigmoidTopKRouter(16, 8, 2)
    for x in (torch.randn(5, 16), torch.randn(5, 16), torch.randn(7, 16)):
        out = r(x)
        a, b = rd(r, (x,), out), parse_output(out, 8, 2)
        assert a.indices is out[1] and all(u is v for u, v in zip(a, b))
    assert len(rd._plans) == 2  # one per signature: the second forward was read by position
    # the same tuple type, now with float "indices" in field 1 and a bool map: parsed again, not read by position
    w, idx, scores = r(torch.randn(5, 16))
    mask = torch.zeros(5, 8, dtype=torch.bool).scatter_(1, idx, True)
    out2 = (w, idx.float(), mask)
    a = rd(r, (), out2)
    assert a.indices is None and a.mask is mask


def test_tuple_reader_passes_a_routing_through():
    rd = _TupleReader(4, 2, "auto")
    r = Routing(indices=torch.zeros(3, 2, dtype=torch.int64), tokens=5)
    for _ in range(2):
        assert rd(nn.Identity(), (), r) is r


@pytest.mark.parametrize("counts_dtype", [torch.int64, torch.int32])  # int32 counts: the checked path
def test_kept_ids_counted_on_both_paths(tmp_path, counts_dtype):
    """Routing.kept_ids (counts form): the kept counts are the ids in [0, E); dropped (-1) and
    out-of-range ids are left out, on the fast path (binned into the kept row) and on the checked one
    (turned into kept_counts for accumulate)."""
    from moeload.tracing.adapters import Adapter, GateSpec

    class Gate(nn.Module):
        num_experts, top_k = 4, 1

        def forward(self, ids):
            return ids

    def counts(module, inputs, out):
        c = torch.bincount(out.clamp(0, 3), minlength=4).to(counts_dtype)
        return Routing(counts=c, kept_ids=out.to(torch.int16), tokens=8)

    model = nn.ModuleDict({"g": Gate()})

    class One(Adapter):
        def find(self, m):
            return [GateSpec(module=model["g"], name="g", num_experts=4, top_k=1, counts=counts, has_kept=True)]

    ids = torch.tensor([0, 1, 1, -1, 3, 7, 2, -1])
    with LoadTracer(model, tmp_path / "t", adapters=[One()], flush_every=4) as tr:
        for _ in range(2):
            model["g"](ids)
            model["g"](ids)
            tr.step()
    t = open_trace(tmp_path / "t")
    assert not t.meta.get("extra", {}).get("disabled_layers")
    np.testing.assert_array_equal(t.counts(kind="kept")[:, 0], [[2, 4, 2, 2]] * 2)
    np.testing.assert_array_equal(t.counts()[:, 0], [[6, 4, 2, 4]] * 2)
