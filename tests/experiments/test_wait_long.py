"""experiments/run_long.sh + wait_long.sh: a detached tiny run, waited for and packed for the trip back."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


def test_run_is_waited_for_and_packed(tmp_path):
    run = tmp_path / "runs" / "tiny"
    start = subprocess.run(["bash", str(ROOT / "experiments/run_long.sh"), str(run), "--config", "tiny", "--device",
                            "cpu", "--steps", "6", "--warmup", "2", "--seq-len", "32", "--batch", "4", "--balance",
                            "bias", "--log-every", "2"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)
    assert start.returncode == 0, start.stderr
    w = subprocess.run(["bash", str(ROOT / "experiments/wait_long.sh"), str(run), "240", str(tmp_path / "out")],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert w.returncode == 0, (w.stdout, w.stderr)
    assert "run ended" in w.stdout and '"status": "done"' in w.stdout
    with tarfile.open(tmp_path / "out" / "tiny.tar.gz") as t:
        names = set(t.getnames())
    assert {"tiny.log", "tiny/summary.json", "tiny/router_bias.npz", "tiny/trace.moeload/manifest.json"} <= names


def test_refuses_a_run_it_did_not_start(tmp_path):
    w = subprocess.run(["bash", str(ROOT / "experiments/wait_long.sh"), str(tmp_path / "none"), "5"],
                       capture_output=True, text=True, timeout=30)
    assert w.returncode == 2 and "run_long.sh" in w.stderr
