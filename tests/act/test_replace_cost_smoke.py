"""benchmarks/replace_cost.py on 2 gloo processes, tiny (hidden 32, FFN 64, 8 experts): it runs, and its bytes are
what a move carries. DeepSpeed with the payloads staged through host memory (the path two ranks sharing one GPU
take, here with host copies); megatron-core (shimmed on CPU) point to point, with the layer's function checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(out: Path, *args: str) -> dict:
    """replace_cost.py --tiny <args> on 2 gloo processes -> its JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_BUILD_OPS": "0"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "benchmarks/replace_cost.py"), "--tiny", *args, "--out", str(out)],
                       capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def test_replace_cost_tiny(tmp_path):
    pytest.importorskip("deepspeed")
    res = _run(tmp_path / "rc.json", "--stage")
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


def test_replace_cost_tiny_megatron(tmp_path):
    pytest.importorskip("megatron.core")
    res = _run(tmp_path / "rc.json", "--framework", "megatron")
    assert res["framework"] == "megatron" and res["ranks"] == 2 and res["backend"] == "gloo"
    assert res["device"] == "cpu" and not res["staged"]
    # one expert from the shape alone, not from the model: linear_fc1 [64, 32] and linear_fc2 [32, 64], no
    # biases; moved with exp_avg and exp_avg_sq (fp32) and one fp32 step scalar per parameter tensor
    assert (res["hidden"], res["ffn"]) == (32, 64)
    n = 2 * 32 * 64
    assert res["params_per_expert"] == n
    per_expert = 4 * (3 * n + 2)
    rows = {row["plan"]: row for row in res["rows"]}
    assert rows["swap"]["experts_moved"] == 2 and rows["swap"]["bytes_total"] == 2 * per_expert
    assert rows["shift"]["experts_moved"] == res["experts"] == 8
    assert rows["shift"]["bytes_total"] == 8 * per_expert
    assert all(s > 0 for row in rows.values() for s in row["seconds"])
    assert all(g == 0 for row in rows.values() for g in row["stage_seconds"])  # nothing staged on the CPU
    # the layer's output on a fixed input after the last re-placement vs before the first (worst rank); the final
    # map is not the contiguous one (two swaps and two shifts leave experts 1 and 4 exchanged)
    assert res["output_max_rel_diff"] is not None and res["output_max_rel_diff"] <= 1e-6
