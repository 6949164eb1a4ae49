"""Changes of the expert->rank map recorded in the trace (manifest `rank_map_changes`) and used by
`Trace.gpu_loads()`: written by TraceWriter and by a real LoadTracer whose router rows are permuted
mid-run (counts stay per logical expert)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from moeload import LoadTracer, open_trace
from moeload.errors import InputError, TraceFormatError
from moeload.trace import Manifest, TraceWriter
from moeload.trace.manifest import read_manifest
from moeload.tracing.adapters import Adapter, GateSpec

L, E, G, K, H, T = 2, 4, 2, 2, 8, 40
NEW = [1, 0, 0, 1]  # experts 1, 2 on rank 0; 0, 3 on rank 1 (contiguous: 0, 1 | 2, 3)


def _write(path: Path, changes: list[dict] | None) -> np.ndarray:
    """6 steps x 2 layers x 4 experts on ep_size 2 -> counts [6, L, E]."""
    c = np.random.default_rng(0).integers(0, 50, size=(6, 1, L, E))
    m = Manifest(layers=["a", "b"], experts_per_layer=[E, E], top_k=1, world_size=1, ep_size=G,
                 rank_map_changes=changes or [])
    with TraceWriter(path, m, fsync=False) as w:
        w.write_block(np.arange(6), c)
    return c[:, 0]


def _loads(c: np.ndarray, e2r: list[int]) -> np.ndarray:
    """c: [S, E] -> [S, G] under one map."""
    r = np.asarray(e2r)
    return np.stack([c[:, r == g].sum(-1) for g in range(G)], -1)


def test_gpu_loads_follow_the_map_in_force_at_each_step(tmp_path):
    changes = [{"step": 4, "layer": 0, "expert_to_rank": [0, 1, 0, 1]},
               {"step": 2, "layer": 0, "expert_to_rank": NEW},  # recorded out of order: sorted by step
               {"step": 4, "layer": 1, "expert_to_rank": [1, 1, 0, 0]},
               {"step": 4, "layer": 1, "expert_to_rank": NEW}]  # same step: the one recorded last wins
    c = _write(tmp_path / "t", changes)
    t = open_trace(tmp_path / "t")
    assert t.meta["rank_map_changes"] == changes
    g = t.gpu_loads()
    np.testing.assert_array_equal(g[:2, 0], _loads(c[:2, 0], [0, 0, 1, 1]))
    np.testing.assert_array_equal(g[2:4, 0], _loads(c[2:4, 0], NEW))
    np.testing.assert_array_equal(g[4:, 0], _loads(c[4:, 0], [0, 1, 0, 1]))
    np.testing.assert_array_equal(g[:4, 1], _loads(c[:4, 1], [0, 0, 1, 1]))
    np.testing.assert_array_equal(g[4:, 1], _loads(c[4:, 1], NEW))
    assert not np.array_equal(g[2:4, 0], _loads(c[2:4, 0], [0, 0, 1, 1]))  # the change does show
    # selections: steps and layers as in any read
    np.testing.assert_array_equal(t.gpu_loads(steps=[5, 1], layers="b"), g[[5, 1]][:, [1]])
    np.testing.assert_array_equal(t.gpu_loads(steps=(3, 5)), g[3:5])


def test_older_trace_without_the_field_reads_as_before(tmp_path):
    c = _write(tmp_path / "t", None)
    mpath = tmp_path / "t" / "manifest.json"
    d = json.loads(mpath.read_text())
    del d["rank_map_changes"]
    mpath.write_text(json.dumps(d))
    t = open_trace(tmp_path / "t")
    assert t.manifest.rank_map_changes == [] and "rank_map_changes" not in t.meta["extra"]
    np.testing.assert_array_equal(t.gpu_loads()[:, 0], _loads(c[:, 0], [0, 0, 1, 1]))


@pytest.mark.parametrize(("value", "says"), [
    ({"step": 1}, "must be a list of objects"),
    ([{"step": 1, "layer": 0}], "with keys step, layer, expert_to_rank"),
    ([{"step": 1, "layer": 0, "expert_to_rank": NEW, "x": 1}], "with keys step, layer, expert_to_rank"),
    ([{"step": -1, "layer": 0, "expert_to_rank": NEW}], "'rank_map_changes[].step' must be in"),
    ([{"step": 1.0, "layer": 0, "expert_to_rank": NEW}], "'rank_map_changes[].step' must be an integer"),
    ([{"step": 1, "layer": 2, "expert_to_rank": NEW}], "names layer 2; the trace has 2 layers"),
    ([{"step": 1, "layer": 0, "expert_to_rank": [0, 1]}], "layer 0 needs 4 ranks in [0, ep_size=2)"),
    ([{"step": 1, "layer": 0, "expert_to_rank": [0, 1, 2, 0]}], "layer 0 needs 4 ranks in [0, ep_size=2)"),
    ([{"step": 1, "layer": 0, "expert_to_rank": "0110"}], "must be a list of ranks"),
    ([{"step": 1, "layer": 0, "expert_to_rank": [0, True, 1, 1]}], "must be an integer"),
])
def test_bad_rank_map_changes_are_one_line_naming_the_file(tmp_path, value, says):
    _write(tmp_path / "t", None)
    mpath = tmp_path / "t" / "manifest.json"
    d = json.loads(mpath.read_text())
    d["rank_map_changes"] = value
    mpath.write_text(json.dumps(d))
    with pytest.raises(TraceFormatError) as e:
        open_trace(tmp_path / "t")
    msg = str(e.value)
    assert says in msg and str(mpath) in msg and "\n" not in msg, msg


# ---- a real LoadTracer: router rows permuted mid-run, as moeload.act does ----------------------------

class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.out = nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.gate(x).softmax(-1).topk(K, -1).values.sum(-1, keepdim=True)
        return self.out(x) * w


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


class EPGates(Adapter):
    """The gates of Net as an expert-parallel framework would report them: ep_size 2, contiguous map,
    top-k indices of the logits."""

    name = "ep-test"

    def find(self, model: nn.Module) -> list[GateSpec]:
        return [GateSpec(module=b.gate, name=f"blocks.{i}.gate", num_experts=E, top_k=K,
                         counts=lambda m, i, o: o.topk(K, -1).indices, expert_to_rank=[0, 0, 1, 1], ep_size=G)
                for i, b in enumerate(model.blocks)]


def _wait_for_manifest(path: Path, timeout: float = 20.0) -> list[dict]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        changes = read_manifest(path).rank_map_changes
        if changes:
            return changes
        time.sleep(0.02)
    return []


def test_tracer_records_a_map_change_and_keeps_counting_logical_experts(tmp_path):
    torch.manual_seed(0)
    net, ref = Net(), Net()
    ref.load_state_dict(net.state_dict())
    xs = [torch.randn(T, H) for _ in range(6)]
    ref_tr = LoadTracer(ref, tmp_path / "ref", adapters=[EPGates()], flush_every=2, fsync=False)
    tr = LoadTracer(net, tmp_path / "t", adapters=[EPGates()], flush_every=2, fsync=False)
    p2l = np.lexsort((np.arange(E), NEW))  # [1, 2, 0, 3]: rank 0's slots hold experts 1, 2
    with ref_tr, tr:
        with pytest.raises(InputError, match="layer 'x' is not a traced layer"):
            tr.record_rank_map(0, "x", NEW)
        with pytest.raises(InputError, match="ranks outside"):
            tr.record_rank_map(0, 0, [0, 1, 2, 0])
        with pytest.raises(InputError, match="permutation of 0..3"):
            tr.record_rank_map(0, 0, NEW, phy2log=[0, 0, 1, 2])
        outs = []
        for s in range(6):
            if s == 3:  # at the step boundary: slot p's router row <- logical expert p2l[p]'s row
                with torch.no_grad():
                    g = net.blocks[0].gate.weight
                    g.copy_(g[torch.as_tensor(p2l)])
                tr.record_rank_map(tr.step_count, "blocks.0.gate", NEW, phy2log=p2l.tolist())
                assert tr.manifest.rank_map_changes == [{"step": 3, "layer": 0, "expert_to_rank": NEW}]
            outs.append((net(xs[s]), ref(xs[s])))
            tr.step()
            ref_tr.step()
            if s == 4:  # the block of steps 2..3 went out after the change: the manifest says so already
                assert _wait_for_manifest(tmp_path / "t") == [{"step": 3, "layer": 0, "expert_to_rank": NEW}]
    for a, b in outs:
        torch.testing.assert_close(a, b)  # the permuted router computes the same function
    t, r = open_trace(tmp_path / "t"), open_trace(tmp_path / "ref")
    assert t.meta["rank_map_changes"] == [{"step": 3, "layer": 0, "expert_to_rank": NEW}]
    assert r.meta["rank_map_changes"] == []
    np.testing.assert_array_equal(t.counts(), r.counts())  # logical experts, not router columns
    g, c = t.gpu_loads(), t.counts()
    np.testing.assert_array_equal(g[:3], r.gpu_loads()[:3])
    np.testing.assert_array_equal(g[3:, 0], _loads(c[3:, 0], NEW))
    np.testing.assert_array_equal(g[:, 1], r.gpu_loads()[:, 1])
    assert not np.array_equal(g[3:, 0], r.gpu_loads()[3:, 0])


def test_record_rank_map_before_start_is_refused(tmp_path):
    tr = LoadTracer(Net(), tmp_path / "t", adapters=[EPGates()])
    with pytest.raises(InputError, match="before start"):
        tr.record_rank_map(0, 0, NEW)
