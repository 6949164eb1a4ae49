"""DeepSpeed expert parallelism over 2 gloo processes: benchmarks/gpu/ds_ep_trace.py at tiny sizes.

The script (also the GPU run) builds `MoE(ep_size=2)` layers after `deepspeed.init_distributed`,
drives them with a DeepSpeed engine and `trace_engine`, and itself asserts that the trace's
per-rank, global and per-GPU counts equal its own recomputed counts. Here the summary and the trace
are checked once more from the outside.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("deepspeed")
from _shims import run_ep_script  # noqa: E402

from moeload import open_trace  # noqa: E402

@pytest.mark.slow
def test_two_ranks_expert_parallel(tmp_path):
    s = run_ep_script("ds_ep_trace.py", tmp_path / "ds.json", "--baseline-steps", "1")
    assert s["ok"] and s["world_size"] == 2 and s["ep_size"] == 2 and s["first_step"] == 1
    t = open_trace(s["trace"])
    assert t.steps.tolist() == [1, 2, 3] and t.meta["count_kind"] == "both"
    assert t.meta["expert_to_rank"] == [[0, 0, 1, 1], [0, 0, 1, 1]]
    rc = t.rank_counts()  # [S, R=2, L, E]
    assert rc.shape == (3, 2, 2, 4)
    assert (rc.sum(-1) == 2 * 32 * 2).all()  # each rank: 2 micro-batches x 32 tokens x top-2
    assert not np.array_equal(rc[:, 0], rc[:, 1])  # the ranks saw different tokens
    np.testing.assert_array_equal(t.counts(), rc.sum(1))
    kept = t.counts(kind="kept")
    assert (kept <= t.counts()).all() and kept.sum() < t.counts().sum()
    np.testing.assert_array_equal(t.gpu_loads(), t.counts().reshape(3, 2, 2, 2).sum(-1))
