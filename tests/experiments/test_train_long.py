"""experiments/train_long.py and run_long.sh on CPU at the --tiny size (real corpus, real tracer)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moeload import open_trace
from moeload.workloads.model import MoELayer

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "train_long.py"
STEPS, BATCH, SEQ = 12, 4, 32
TINY = ["--tiny", "--device", "cpu", "--seq-len", str(SEQ), "--batch", str(BATCH), "--warmup", "3", "--log-every", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _module():
    spec = importlib.util.spec_from_file_location("train_long", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _train(out: Path, *args: str, steps: int = STEPS) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *TINY, "--steps", str(steps), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=120, env=ENV, cwd=ROOT)


@pytest.fixture(scope="module", params=["aux", "bias"])
def run(request, tmp_path_factory) -> tuple[str, Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp(request.param) / "run"
    return request.param, out, _train(out, "--balance", request.param)


def test_trace_has_every_step_layer_and_route(run):
    balance, out, p = run
    assert p.returncode == 0, p.stderr
    t = open_trace(out / "trace.moeload")
    c = t.counts()  # [S, L, E]
    assert c.shape == (STEPS, 2, 4)
    assert list(t.steps) == list(range(STEPS))
    assert t.layers == ["blocks.0.moe.router", "blocks.1.moe.router"]
    assert (c.sum(-1) == BATCH * SEQ * 2).all()  # tokens x top_k routed per layer and step
    kept = t.counts(kind="kept")
    assert (kept <= c).all() and (kept <= math.ceil(1.25 * BATCH * SEQ * 2 / 4)).all()  # capacity 1.25
    assert (kept < c).any()  # an untrained router overflows some expert at capacity 1.25
    assert t.meta["tokens_per_step"] == BATCH * SEQ
    assert t.meta["extra"]["balance"] == balance


def test_summary_and_progress(run):
    balance, out, p = run
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "done" and s["steps"] == STEPS and s["tokens_per_step"] == BATCH * SEQ
    assert len(s["lm_loss_first20"]) == STEPS and s["steps_per_s"] > 0
    assert s["lr_last"] == pytest.approx(s["config"]["lr"] * 0.1)  # the schedule completes inside the run
    assert s["torch"] == torch.__version__ and s["gpu"] == "cpu" and s["tracer_errors"] == []
    assert 0 < s["val_lm_loss"] < 6 and [r[0] for r in s["rates"]] == [4, 8, 12]
    assert p.stdout.count(" steps/s ETA ") == STEPS // 4


def test_bias_moves_only_under_bias_balancing(run):
    balance, out, _ = run
    if balance == "aux":
        assert not (out / "router_bias.npz").exists()
        return
    z = np.load(out / "router_bias.npz")
    assert z["bias"].shape == (1, 2, 4) and list(z["after_step"]) == [STEPS - 1]
    b = z["bias"][-1]  # [L, E]
    assert np.abs(b).max() > 0
    c = open_trace(out / "trace.moeload").counts().astype(np.float64)  # [S, L, E] routed = the load
    expected = 1e-3 * np.sign(c.mean(-1, keepdims=True) - c).sum(0)  # bias_e += u * sign(mean - load_e)
    np.testing.assert_allclose(b, expected, atol=1e-6)


def test_existing_out_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    p = _train(tmp_path / "run", steps=5)
    assert p.returncode == 2 and "already exists" in p.stderr


def test_grouped_moe_matches_the_reference_layer_with_drops():
    tl = _module()
    torch.manual_seed(0)
    ref = MoELayer(16, 32, 4, 2, capacity_factor=1.0)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 50, 16)
    assert not ref.router(x.reshape(-1, 16)).kept.all()  # some routes dropped
    y_ref, aux_ref = ref(x)
    y, aux = tl.GroupedMoE(ref.router, ref.experts)(x)
    torch.testing.assert_close(y, y_ref)
    assert aux == aux_ref


def test_bias_router_selects_with_bias_and_weights_without():
    tl = _module()
    torch.manual_seed(0)
    r = tl.BiasRouter(8, 4, 2)
    x = torch.randn(10, 8)
    r.expert_bias.copy_(torch.tensor([10.0, 0, 0, 10.0]))
    out = r(x)
    assert (out.indices.sort(-1).values == torch.tensor([0, 3])).all()
    p = out.probs[:, [0, 3]]
    torch.testing.assert_close(out.weights.sort(-1).values, (p / p.sum(-1, keepdim=True)).sort(-1).values)
    r.update_bias()  # experts 0 and 3 took every route: their bias falls, the others' rises
    assert torch.allclose(r.expert_bias, torch.tensor([10 - 1e-3, 1e-3, 1e-3, 10 - 1e-3]))


def test_run_long_detached_and_killed_keeps_its_trace(tmp_path):
    d = tmp_path / "long"
    p = subprocess.run(["bash", str(ROOT / "experiments" / "run_long.sh"), str(d), *TINY, "--steps", "100000",
                        "--summary-every", "50"], capture_output=True, text=True, timeout=30,
                       env={**ENV, "PYTHON": sys.executable}, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    pid = int(Path(f"{d}.pid").read_text())
    try:
        deadline = time.time() + 40
        while time.time() < deadline and not (d / "summary.json").exists():
            time.sleep(0.5)
        assert (d / "summary.json").exists(), Path(f"{d}.log").read_text()
        assert "step 4/100000" in Path(f"{d}.log").read_text()
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 20
    while time.time() < deadline and json.loads((d / "summary.json").read_text())["status"] == "running":
        time.sleep(0.3)
    s = json.loads((d / "summary.json").read_text())
    assert s["status"].startswith("stopped: SystemExit") and s["steps"] >= 50
    assert len(open_trace(d / "trace.moeload").steps) == s["steps"]  # close() flushed the partial block
