"""Parallel layouts on real gloo process groups (2 and 4 processes): pipeline stages (even, uneven, a
stage without MoE layers), data-parallel replicas of a stage, tensor-parallel replicas of a router,
and settings that cannot be reconciled (refused on every rank at construction, training not killed).

Each worker builds only the layers its rank holds (global names `layers.<i>.router`, as a pipeline
stage of torchtitan keeps them), routes tokens drawn from a seed of (rank, layer, step) and writes its
own per-step counts; the tests compare the trace against them from outside. Every run has a hard
timeout, so CI never hangs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _shims import run_workers

from moeload import open_trace
from moeload.errors import InputError
from moeload.tracing.ranks import describe, reconcile, to_global

ROOT = Path(__file__).resolve().parents[2]
HARD_TIMEOUT = 90
E, K, T, STEPS = 6, 2, 16, 7

WORKER = textwrap.dedent(
    """
    import json, sys, warnings
    import torch, torch.distributed as dist
    from torch import nn
    torch.set_num_threads(1)
    from moeload import LoadTracer
    rank, world, path, out, cfg = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    E, K, T = cfg["E"], cfg["K"], cfg["T"]

    class Router(nn.Module):  # torchtitan-style: (scores, top-k weights, top-k indices)
        def __init__(self, layer):
            super().__init__()
            self.layer, self.num_experts, self.top_k = layer, cfg.get("experts", {}).get(str(rank), E), K
            self.w = nn.Parameter(torch.zeros(1))
        def forward(self, x):
            g = torch.Generator().manual_seed(1000 * x + 10 * self.layer + cfg["seed_of"][rank])
            scores = torch.rand(T, self.num_experts, generator=g)
            w, idx = scores.topk(K, dim=-1)
            return scores, w, idx

    class Stage(nn.Module):
        def __init__(self, ids):
            super().__init__()
            self.layers = nn.ModuleDict({str(i): nn.Module() for i in ids})
            for i in ids:
                self.layers[str(i)].router = Router(i)
            self.dense = nn.Linear(2, 2)

    ids = cfg["layers"][rank]
    model = Stage(ids)
    kw = dict(flush_every=cfg.get("flush", {}).get(str(rank), 3), gates="*.router", flush_timeout=30)
    if cfg.get("tp"):
        kw["tp_group"] = dist.new_group(list(range(world)))
    res = {"rank": rank, "refs": {}}
    with warnings.catch_warnings(record=True) as wrn:
        warnings.simplefilter("always")
        try:
            tracer = LoadTracer(model, path, **kw)
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
            dist.barrier()
            open(out, "w").write(json.dumps(res))
            dist.destroy_process_group()
            sys.exit(0)
        res["layers"], res["local"] = tracer.layers, tracer.local_layers
        with tracer:
            for s in range(cfg["steps"]):
                for i in ids:
                    _, _, idx = model.layers[str(i)].router(s)
                    res["refs"].setdefault(str(i), []).append(torch.bincount(idx.flatten(), minlength=E).tolist())
                tracer.step()
    res["warnings"] = [str(x.message) for x in wrn if str(x.message).startswith("moeload")]
    open(out, "w").write(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()  # gloo's threads joined before exit (else an abort at interpreter exit)
    """
)


def run_ranks(tmp_path: Path, layers: list[list[int]], **cfg) -> list[dict]:
    """One process per entry of `layers` (the layer ids that rank holds); -> each rank's result."""
    world = len(layers)
    cfg = {"E": E, "K": K, "T": T, "steps": STEPS, "layers": layers, "seed_of": cfg.pop("seed_of", list(range(world))),
           **cfg}
    outs = [tmp_path / f"rank{r}.json" for r in range(world)]
    run_workers(tmp_path, WORKER, world, lambda r: [str(world), str(tmp_path / "t"), str(outs[r]), json.dumps(cfg)],
                timeout=HARD_TIMEOUT)
    return [json.loads(o.read_text()) for o in outs]


def names(ids) -> list[str]:
    return [f"layers.{i}.router" for i in ids]


def expected(res: list[dict], n_layers: int, counted=None) -> tuple[np.ndarray, np.ndarray]:
    """-> (global [S, L, E], per rank [S, R, L, E]) from the workers' own counts."""
    R = len(res)
    per = np.zeros((STEPS, R, n_layers, E), np.int64)
    for r, d in enumerate(res):
        for i, rows in d["refs"].items():
            per[:, r, int(i)] = rows
    keep = np.ones(R, bool) if counted is None else np.asarray(counted)
    return per[:, keep].sum(1), per


def test_pipeline_stages_even_two_ranks(tmp_path):
    res = run_ranks(tmp_path, [[0, 1], [2, 3]])
    t = open_trace(tmp_path / "t")
    assert t.layers == names(range(4)) == res[0]["layers"] == res[1]["layers"]
    assert res[1]["local"] == names([2, 3])
    glob, per = expected(res, 4)
    np.testing.assert_array_equal(t.counts(), glob)
    np.testing.assert_array_equal(t.rank_counts(), per)  # a stage's rows of the other stage's layers are zero
    assert t.meta["extra"]["layer_owners"] == {n: [0] if i < 2 else [1] for i, n in enumerate(names(range(4)))}
    assert (t.counts().sum(-1) == T * K).all()  # every layer routed its tokens once, none twice
    assert not any(r["warnings"] for r in res)


def test_pipeline_times_data_parallel_uneven_four_ranks(tmp_path):
    """PP 2 x DP 2, uneven stages (3 MoE layers, then 1): a layer's count is the sum of its two DP
    replicas, never of different layers; the interleaved layer order of the stages is restored."""
    res = run_ranks(tmp_path, [[0, 2, 4], [0, 2, 4], [9], [9]])
    t = open_trace(tmp_path / "t")
    order = [0, 2, 4, 9]
    assert t.layers == names(order)
    glob, per = expected(res, 10)
    np.testing.assert_array_equal(t.counts(), glob[:, order])
    np.testing.assert_array_equal(t.rank_counts(), per[:, :, order])
    assert (t.counts().sum(-1) == 2 * T * K).all()
    assert t.meta["extra"]["layer_owners"]["layers.9.router"] == [2, 3]


def test_stage_without_moe_layers_and_layer_10_after_9(tmp_path):
    res = run_ranks(tmp_path, [[9, 10], [], [1]])
    t = open_trace(tmp_path / "t")
    assert t.layers == names([1, 9, 10])  # numbers compared as numbers
    assert res[1]["local"] == [] and res[1]["layers"] == t.layers
    glob, _ = expected(res, 11)
    np.testing.assert_array_equal(t.counts(), glob[:, [1, 9, 10]])


def test_tensor_parallel_replicas_are_counted_once(tmp_path):
    res = run_ranks(tmp_path, [[0, 1], [0, 1]], tp=True, seed_of=[0, 0])  # both ranks route the same tokens
    t = open_trace(tmp_path / "t")
    glob, _ = expected(res, 2, counted=[True, False])
    np.testing.assert_array_equal(t.counts(), glob)
    assert (t.counts().sum(-1) == T * K).all()
    assert (t.rank_counts()[:, 1] == 0).all()
    assert t.meta["extra"]["replica_ranks"] == {"1": 0} and "disabled_layers" not in t.meta["extra"]


def test_declared_replicas_that_see_other_tokens_are_flagged(tmp_path):
    res = run_ranks(tmp_path, [[0, 1], [0, 1]], tp=True, seed_of=[0, 5])
    t = open_trace(tmp_path / "t")
    dis = t.meta["extra"]["disabled_layers"]
    assert set(dis) == set(names([0, 1])) and dis["layers.0.router"]["ranks"] == [1]
    assert "tensor-parallel replica" in dis["layers.0.router"]["reason"]
    assert any("tensor-parallel replica" in m for m in res[0]["warnings"])
    out = subprocess.run([sys.executable, "-m", "moeload", "check", str(tmp_path / "t")], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 2 and "layers.0.router was disabled" in out.stdout + out.stderr


@pytest.mark.parametrize("what, cfg, needle", [
    ("flush_every", {"flush": {"0": 3, "1": 4}}, "flush_every differs across ranks (rank 0: 3, rank 1: 4)"),
    ("experts", {"experts": {"0": 6, "1": 5}}, "layer 'layers.0.router' has num_experts 6 on rank 0 but 5 on rank 1"),
])
def test_irreconcilable_settings_are_refused_on_every_rank(tmp_path, what, cfg, needle):
    res = run_ranks(tmp_path, [[0], [0]], **cfg)
    for r in res:
        assert r["error"].startswith("InputError: LoadTracer: ") and needle in r["error"], r["error"]
    assert not (tmp_path / "t").exists()


def test_reconcile_is_pure_and_refuses_clearly():
    a = {"flush_every": 2, "record_eval": False, "kept": True, "ranks": "auto", "replica_of": None}
    d = [describe(f"layers.{i}.router", 4, 1, "routed") for i in range(3)]
    lay = reconcile([{**a, "layers": d[:2]}, {**a, "layers": d[2:]}])
    assert lay.names == [x["name"] for x in d] and lay.width == 2 and not lay.uniform
    assert lay.index.tolist() == [[0, 1, -1], [-1, -1, 0]] and lay.local_slots(1) == [2]
    assert reconcile([{**a, "layers": d}, {**a, "layers": d}]).uniform
    block = np.arange(1 * 2 * 1 * 2 * 3).reshape(1, 2, 1, 2, 3)  # [S, R, P, width, W]
    g, bad = to_global(block, lay)
    assert g.shape == (1, 2, 1, 3, 3) and not bad
    np.testing.assert_array_equal(g[0, 0, 0, :2], block[0, 0, 0]) and np.testing.assert_array_equal(g[0, 1, 0, 2], block[0, 1, 0, 0])
    assert (g[0, 0, 0, 2] == 0).all() and (g[0, 1, 0, :2] == 0).all()
    with pytest.raises(InputError, match="none of the 2 ranks holds a gating module"):
        reconcile([{**a, "layers": []}, {**a, "layers": []}])
    with pytest.raises(InputError, match="rank 1 is a tensor-parallel replica of rank 0 but holds other gates"):
        reconcile([{**a, "layers": d[:2]}, {**a, "layers": d[:1], "replica_of": 0}])
    with pytest.raises(InputError, match="has top_k 1 on rank 0 but 2 on rank 1"):
        reconcile([{**a, "layers": d[:1]}, {**a, "layers": [describe("layers.0.router", 4, 2, "routed")]}])
