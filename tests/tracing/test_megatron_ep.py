"""Megatron-core expert parallelism over 2 gloo processes: benchmarks/gpu/mcore_ep_trace.py at tiny sizes.

The script (also the GPU run) builds MoELayers with expert-model-parallel size 2, traces them with
auto-discovered `TopKRouter`s and itself asserts the trace's per-rank, global and per-GPU counts
against its own recomputed top-k intersected with the routing map; checked again here from outside.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("megatron.core")
from _shims import run_ep_script  # noqa: E402

from moeload import open_trace  # noqa: E402

@pytest.mark.slow
def test_two_ranks_expert_parallel(tmp_path):
    s = run_ep_script("mcore_ep_trace.py", tmp_path / "mc.json", "--baseline-steps", "0")
    assert s["ok"] and s["world_size"] == 2 and s["ep_size"] == 2
    t = open_trace(s["trace"])
    assert t.steps.tolist() == [0, 1, 2] and t.layers == ["0.router", "1.router"]
    assert t.meta["expert_to_rank"] == [[0, 0, 1, 1], [0, 0, 1, 1]]
    rc = t.rank_counts()  # [S, R=2, L, E]
    assert (rc.sum(-1) == 2 * 32 * 2).all()  # each rank: 2 micro-batches x 32 tokens x top-2, no dropping
    assert not np.array_equal(rc[:, 0], rc[:, 1])
    assert s["framework"]["this_rank_routes_before_capacity"] == 3 * 2 * 32 * 2 * 2  # steps x micro x tokens x k x layers
    np.testing.assert_array_equal(t.gpu_loads(), t.counts().reshape(3, 2, 2, 2).sum(-1))
