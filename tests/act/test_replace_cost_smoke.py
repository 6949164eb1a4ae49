"""benchmarks/replace_cost.py on 2 gloo processes, tiny, with the payloads staged through host memory (the path
two ranks sharing one GPU take, here with host copies): it runs, and its bytes are what a move carries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_replace_cost_tiny(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "rc.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_BUILD_OPS": "0"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "benchmarks/replace_cost.py"), "--tiny", "--stage", "--out", str(out)],
                       capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    n = res["params_per_expert"]
    rows = {row["plan"]: row for row in res["rows"]}
    # after the Adam step (gradients freed): parameters, exp_avg, exp_avg_sq in fp32, and one step scalar
    # per parameter tensor (two Linear layers: four tensors)
    per_expert = 4 * (3 * n + 4)
    assert rows["swap"]["experts_moved"] == 2 and rows["swap"]["bytes_total"] == 2 * per_expert
    assert rows["shift"]["experts_moved"] == res["experts"] == 8
    assert rows["shift"]["bytes_total"] == 8 * per_expert
    assert all(s > 0 for row in rows.values() for s in row["seconds"])
    # the staging copies were made, timed apart, and are part of the whole
    assert res["staged"] and res["device"] == "cpu" and res["backend"] == "gloo"
    assert all(0 < g < s for row in rows.values() for g, s in zip(row["stage_seconds"], row["seconds"]))
