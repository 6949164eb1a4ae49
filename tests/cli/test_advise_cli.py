"""`moeload advise` and `moeload calibrate` through the real CLI."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from moeload.cli import app
from tests.cli._cli import one_line_error

runner = CliRunner()
NAMES = ["none", "eplb_static", "eplb_periodic", "ema_migration", "reactive", "forecast", "oracle"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_advise_json_contract(trace_dir) -> None:
    r = run("advise", trace_dir, "--gpus", 4, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [s["name"] for s in out["strategies"]] == NAMES
    assert out["calibration"] == "default" and out["recommended"] in NAMES
    for s in out["strategies"]:
        assert set(s) == {"name", "step_ms", "saving_pct", "saving_interval", "moved_experts", "moved_bytes",
                          "extra_memory_bytes"}
        assert s["step_ms"] > 0
    oracle = out["strategies"][-1]["step_ms"]
    assert oracle <= min(s["step_ms"] for s in out["strategies"]) + 1e-12


def test_advise_table_says_default_calibration_and_writes_artifacts(trace_dir, tmp_path) -> None:
    art = tmp_path / "advice"
    fig = tmp_path / "advice.png"
    r = run("advise", trace_dir, "--gpus", 2, "--replicas", 12, "--artifacts", art, "--figure", fig)
    assert r.exit_code == 0, r.output
    assert "default calibration" in r.stdout and "recommended:" in r.stdout
    sg = json.loads((art / "sglang_init_expert_location.json").read_text())
    p2l = np.asarray(sg["physical_to_logical_map"])
    assert p2l.shape == (3, 12) and all(set(row) == set(range(8)) for row in p2l.tolist())
    ep = json.loads((art / "eplb_phy2log.json").read_text())
    assert np.asarray(ep["logcnt"]).sum(axis=1).tolist() == [12, 12, 12]
    log2phy = np.asarray(ep["log2phy"])
    for layer in range(3):  # log2phy lists exactly the slots phy2log assigns to each expert
        for e in range(8):
            slots = [s for s in log2phy[layer, e] if s >= 0]
            assert sorted(slots) == [s for s in range(12) if p2l[layer, s] == e]
    vllm = (art / "vllm_eplb.txt").read_text()
    cfg = json.loads(vllm.split("--eplb-config '")[1].split("'")[0])
    assert cfg["num_redundant_experts"] == 4 and "--enable-eplb" in vllm
    assert fig.stat().st_size > 1000


def test_advise_bad_input_is_one_line(trace_dir, tmp_path) -> None:
    one_line_error(run("advise", trace_dir, "--gpus", 3), "--gpus 3")
    one_line_error(run("advise", trace_dir, "--gpus", 2, "--replicas", 9), "--replicas 9")
    one_line_error(run("advise", trace_dir, "--gpus", 0), "--gpus")
    bad = tmp_path / "calib.json"
    bad.write_text('{"tokens": [0, 1], "seconds": [2, 1]}')
    one_line_error(run("advise", trace_dir, "--gpus", 2, "--calibration", bad), str(bad))
    one_line_error(run("advise", trace_dir, "--gpus", 2, "--artifacts", trace_dir / "x"), "inside the input trace")


def test_calibrate_cpu_then_advise_is_measured(trace_dir, tmp_path) -> None:
    cal = tmp_path / "calib.json"
    r = run("calibrate", "--device", "cpu", "--hidden", 32, "--ffn-hidden", 64, "--experts-per-gpu", 2,
            "--repeats", 2, "--out", cal)
    assert r.exit_code == 0, r.output
    c = json.loads(cal.read_text())
    assert c["measured"] is True and c["device"].startswith("cpu") and c["tokens"][0] == 0
    assert all(b >= a for a, b in zip(c["seconds"], c["seconds"][1:]))
    r = run("advise", trace_dir, "--gpus", 2, "--calibration", cal, "--json", "--hidden", 32, "--ffn-hidden", 64)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["calibration"] == "measured"


def test_calibrate_without_gpu_is_one_line(tmp_path) -> None:
    import torch

    if torch.cuda.is_available():
        return
    one_line_error(run("calibrate", "--hidden", 32, "--ffn-hidden", 64, "--experts-per-gpu", 2,
                       "--out", tmp_path / "c.json"), "no CUDA GPU")


def test_report_has_an_advice_section(trace_dir, tmp_path) -> None:
    out = tmp_path / "r.html"
    r = run("report", trace_dir, "-o", out, "--gpus", 4)
    assert r.exit_code == 0, r.output
    page = out.read_text()
    assert "Advice on 4 GPUs (default calibration" in page and "recommended: <b>" in page
    r = run("report", trace_dir, "-o", out, "--gpus", 3)  # 8 experts do not split over 3 GPUs: said, not fatal
    assert r.exit_code == 0, r.output
    assert "not computed" in out.read_text()


def test_a_layer_without_tokens_is_flagged(counts, tmp_path) -> None:
    from tests.cli.conftest import write_trace

    c = counts.copy()
    c[:, 2] = 0  # layer 2 never routed anything (e.g. hooks that never ran)
    t = write_trace(tmp_path / "z.moeload", c)
    r = run("advise", t, "--gpus", 4, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["zero_layers"] == [2]
    assert "moeload: warning: advise: layer(s) [2] received no token" in r.stderr
