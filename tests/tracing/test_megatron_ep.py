"""Megatron-core expert parallelism over 2 gloo processes: benchmarks/gpu/mcore_ep_trace.py at tiny sizes.

The script (also the GPU run) builds MoELayers with expert-model-parallel size 2, traces them with
auto-discovered `TopKRouter`s and itself asserts the trace's per-rank, global and per-GPU counts
against its own recomputed top-k intersected with the routing map; checked again here from outside.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("megatron.core")
from _shims import free_port  # noqa: E402

from moeload import open_trace  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_ranks_expert_parallel(tmp_path):
    out = tmp_path / "mc.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "benchmarks/gpu/mcore_ep_trace.py"), "--out", str(out), "--device", "cpu", "--hidden", "16",
           "--experts", "4", "--tokens", "32", "--steps", "3", "--baseline-steps", "0", "--flush-every", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["ok"] and s["world_size"] == 2 and s["ep_size"] == 2
    t = open_trace(s["trace"])
    assert t.steps.tolist() == [0, 1, 2] and t.layers == ["0.router", "1.router"]
    assert t.meta["expert_to_rank"] == [[0, 0, 1, 1], [0, 0, 1, 1]]
    rc = t.rank_counts()  # [S, R=2, L, E]
    assert (rc.sum(-1) == 2 * 32 * 2).all()  # each rank: 2 micro-batches x 32 tokens x top-2, no dropping
    assert not np.array_equal(rc[:, 0], rc[:, 1])
    assert s["framework"]["this_rank_routes_before_capacity"] == 3 * 2 * 32 * 2 * 2  # steps x micro x tokens x k x layers
    np.testing.assert_array_equal(t.gpu_loads(), t.counts().reshape(3, 2, 2, 2).sum(-1))
