"""benchmarks/placement_gpu.py runs end to end on CPU (gloo, 2 processes, tiny sizes)."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "placement_gpu.py"


def _module():
    spec = importlib.util.spec_from_file_location("placement_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_split_counts_keeps_each_units_total():
    mod = _module()
    total = np.array([[7, 3, 0], [10, 1, 5]])
    phy2log = np.array([0, 1, 0, 2, 0, 1])
    share = np.array([0.5, 1.0, 0.3, 1.0, 0.2, 0.0])
    out = mod.split_counts(total, phy2log, share)
    np.testing.assert_array_equal(np.stack([np.bincount(phy2log, r, 3) for r in out]), total)
    assert out[1, 5] == 0 and out[1, 1] == 1
    np.testing.assert_array_equal(mod.rank_max(out, 2), [max(out[0, :3].sum(), out[0, 3:].sum()),
                                                         max(out[1, :3].sum(), out[1, 3:].sum())])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_script_runs_on_cpu_with_two_gloo_processes(tmp_path):
    from moeload.trace import Manifest, TraceWriter

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(8) * 0.5, size=2)
    routed = np.stack([[rng.multinomial(256, p[i]) for i in range(2)] for _ in range(30)])[:, None]
    with TraceWriter(tmp_path / "t.moeload", Manifest(layers=["a", "b"], experts_per_layer=[8, 8], top_k=2)) as w:
        w.write_block(np.arange(30), routed)
    np.save(tmp_path / "b.npy", rng.integers(5, 60, size=(2, 8)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(SCRIPT), "--device", "cpu", "--tiny", "--trace", str(tmp_path / "t.moeload"),
           "--head-budgets", str(tmp_path / "b.npy"), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    moe, attn = res["moe"], res["attention"]
    assert res["world_size"] == 2 and moe["num_replicas"] == {"contiguous": 8, "balanced": 10}
    assert moe["predicted_speedup"] >= 1.0 and moe["measured_speedup"] > 0
    assert moe["realised_imbalance"]["balanced"] < moe["realised_imbalance"]["contiguous"]
    assert attn["imbalance"]["fair_copying"] <= attn["imbalance"]["standard_tp"]
    assert "| moe | contiguous | balanced |" in (tmp_path / "out" / "results.md").read_text()
