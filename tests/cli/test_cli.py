"""Every command on a small realistic trace, in-process (typer's CliRunner), plus one subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _cli import one_line_error
from typer.testing import CliRunner

from moeload.cli import app
from moeload.trace import open_trace

COMMANDS = ["info", "check", "summary", "states", "predict", "backtest", "plan", "export", "plot", "report", "import"]
runner = CliRunner()


def run(*args: str, code: int = 0):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == code, (r.output, r.exception)
    return r


def run_json(*args: str):
    return json.loads(run(*args, "--json").stdout)


def test_help_lists_every_command_and_each_shows_an_example():
    out = run("--help").output
    for c in COMMANDS:
        assert c in out
        assert "Example: moeload " + c in " ".join(run(c, "--help").output.split())


def test_python_m_moeload_runs_in_a_subprocess():
    p = subprocess.run([sys.executable, "-m", "moeload", "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "predict" in p.stdout and "import" in p.stdout


def test_info(trace_dir, counts):
    d = run_json("info", trace_dir)
    assert (d["num_steps"], d["first_step"], d["last_step"]) == (len(counts), 0, len(counts) - 1)
    assert (d["num_layers"], d["experts_per_layer"], d["ep_size"], d["parts"]) == (3, [8, 8, 8], 2, 2)
    assert d["size_bytes"] > 0 and d["manifest"]["framework"] == "synthetic"
    assert "size on disk" in run("info", trace_dir).stdout


def test_summary_statistics_match_the_counts(trace_dir, counts):
    d = run_json("summary", trace_dir, "--steps", "60:160", "--layers", "0,2")
    assert (d["first_step"], d["last_step"], d["num_steps"]) == (60, 159, 100)
    assert [x["layer"] for x in d["layers"]] == [0, 2]
    tot = counts[60:160, 2].sum(0)
    lay = d["layers"][1]
    assert lay["assignments"] == int(tot.sum())
    assert lay["hottest"][0][0] == int(tot.argmax()) and lay["coldest"][0][0] == int(tot.argmin())
    assert lay["cv"] == pytest.approx(tot.std() / tot.mean())
    assert lay["min_max"] == pytest.approx(tot.min() / tot.max())
    per_step = counts[60:160, 2].max(1) / counts[60:160, 2].mean(1)
    assert lay["imbalance_mean"] == pytest.approx(per_step.mean())
    assert lay["imbalance_max"] == pytest.approx(per_step.max())
    assert all(-1 <= x["boundary"] < 160 for x in d["layers"])
    assert "hottest" in run("summary", trace_dir).stdout


def test_states_segments_cover_the_trace(trace_dir):
    d = run_json("states", trace_dir, "--method", "window")
    assert len(d["layers"]) == 3
    for lay in d["layers"]:
        segs = lay["segments"]
        assert segs[0]["start"] == 0 and segs[-1]["stop"] == 160
        assert all(a["stop"] == b["start"] for a, b in zip(segs, segs[1:]))
        # the boundary is the final stable segment's start once confirmed (docs/metrics.md, item 5),
        # else -1: a 160-step trace is shorter than the 300-step confirmation, so "not stable yet"
        assert lay["boundary"] in ((segs[-1]["start"], -1) if segs[-1]["stable"] else (-1,))
    out = run("states", trace_dir).stdout
    assert "stable from" in out or "not stable yet" in out


def test_predict_from_the_end_and_from_a_step(trace_dir, tmp_path):
    d = run_json("predict", trace_dir, "--predictor", "ema", "--horizon", "12")
    f = np.asarray(d["forecast"])
    assert f.shape == (12, 3, 8) and np.allclose(f.sum(-1), 1) and (f >= 0).all()
    assert d["origin"] == 160 and d["fit_steps"] == [0, 159, 160] and d["errors"] is None
    d = run_json("predict", trace_dir, "--predictor", "last", "--at", "100", "--horizon", "20", "--history", "30")
    assert d["fit_steps"] == [70, 99, 30] and d["evaluated_steps"] == 20
    assert all(e > 0 for e in d["errors"]["mae_pp"])
    out = tmp_path / "f.npy"
    r = run("predict", trace_dir, "--horizon", "5", "-o", out)
    assert np.load(out).shape == (5, 3, 8) and "written" in r.stdout


def test_predict_list(trace_dir):
    assert "sw_avg" in run("predict", "--list").stdout.split()


def test_backtest(trace_dir, tmp_path):
    out = tmp_path / "bt.csv"
    d = run_json("backtest", trace_dir, "--predictors", "last,sw_avg", "--horizons", "10,20", "-o", out)
    preds = {r["predictor"] for r in d["summary"]}
    assert preds == {"last", "sw_avg"} and {r["horizon"] for r in d["summary"]} == {10, 20}
    assert all(r["havg_mae_pp"] >= 0 for r in d["summary"])
    import pandas as pd

    assert set(pd.read_csv(out)["predictor"]) == {"last", "sw_avg"}
    assert "havg_mae_pp" in run("backtest", trace_dir, "--predictors", "last", "--no-phases").stdout


def test_plan(trace_dir, tmp_path):
    d = run_json("plan", trace_dir, "--gpus", "4", "--replicas", "12", "--policy", "eplb", "--at", "120", "--horizon", "20")
    phy2log = np.asarray(d["phy2log"])
    rc = np.asarray(d["replica_counts"])
    assert phy2log.shape == (3, 12) and (rc.sum(1) == 12).all() and (rc >= 1).all()
    assert all(x >= 1 for x in d["imbalance"]) and d["evaluated_steps"] == 20
    # replicas and a balancing policy beat contiguous placement on the loads it planned for
    assert all(a <= b + 1e-9 for a, b in zip(d["imbalance"], d["contiguous_imbalance"]))
    out = tmp_path / "plan.json"
    run("plan", trace_dir, "--policy", "contiguous", "-o", out)
    assert json.loads(out.read_text())["num_gpus"] == 2  # the trace's ep_size


def test_export_formats_and_selection(trace_dir, counts, tmp_path):
    run("export", trace_dir, tmp_path / "c.npz", "--steps", "10:20", "--layers", "0,2")
    z = np.load(tmp_path / "c.npz")
    np.testing.assert_array_equal(z["counts"], counts[10:20][:, [0, 2]])
    assert z["steps"].tolist() == list(range(10, 20)) and len(z["layers"]) == 2
    run("export", trace_dir, tmp_path / "p.npy", "--what", "proportions")
    p = np.load(tmp_path / "p.npy")
    np.testing.assert_allclose(p, counts / counts.sum(-1, keepdims=True))
    run("export", trace_dir, tmp_path / "c.csv", "--steps", "5")
    import pandas as pd

    df = pd.read_csv(tmp_path / "c.csv")
    assert list(df.columns) == ["step", "layer", "layer_name", "expert", "count"]
    assert len(df) == 3 * 8 and df["count"].sum() == counts[5].sum()


def test_export_csv_imports_back(trace_dir, counts, tmp_path):
    run("export", trace_dir, tmp_path / "c.csv")
    r = run("import", "csv", tmp_path / "c.csv", tmp_path / "back", "--top-k", "2")
    assert "160 steps" in r.stdout
    t = open_trace(tmp_path / "back")
    np.testing.assert_array_equal(t.counts(), counts)
    assert t.layers == open_trace(trace_dir).layers and t.top_k == [2, 2, 2]


def test_plot_writes_png_and_svg(trace_dir, tmp_path):
    run("plot", trace_dir, "-o", tmp_path / "png")
    files = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert files == ["fluctuation.png", "heatmap-layer0.png", "proportions-layer0.png"]
    assert (tmp_path / "png/heatmap-layer0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run("plot", trace_dir, "forecast", "gpu-load", "--layers", "1,2", "--format", "svg", "--at", "100", "-o", tmp_path / "svg")
    names = sorted(p.name for p in (tmp_path / "svg").iterdir())
    assert names == ["forecast-layer1.svg", "forecast-layer2.svg", "gpu-load-layer1.svg", "gpu-load-layer2.svg"]
    assert "<svg" in (tmp_path / "svg/forecast-layer1.svg").read_text()


def test_report_is_one_self_contained_page(trace_dir, tmp_path):
    out = tmp_path / "r.html"
    run("report", trace_dir, "-o", out, "--layers", "0,1", "--at", "120", "--horizon", "20")
    page = out.read_text()
    # fluctuation, per-GPU load (the trace has ep_size 2), heatmap, proportions, forecast per layer, and the
    # advice figure (on the trace's 2 expert-parallel ranks)
    assert page.count("<img") == 2 + 3 * 2 + 1 and page.count("data:image/png;base64,") == 9
    assert "Advice on 2 GPUs" in page
    assert "src='http" not in page and "<script" not in page and "<link" not in page
    assert "Imbalance and phases" in page and "model.layers.1.mlp.gate" in page


# ---- user errors: exit code 2, one line, no traceback ----------------------------------------

def _broken_traces(trace_dir: Path, tmp: Path) -> dict[str, Path]:
    import shutil

    out = {"missing dir": tmp / "nope", "not a trace": tmp / "empty"}
    out["not a trace"].mkdir()
    f = tmp / "file.txt"
    f.write_text("x")
    out["a file"] = f
    bad = tmp / "badmanifest"
    shutil.copytree(trace_dir, bad)
    (bad / "manifest.json").write_text("{not json")
    out["corrupt manifest"] = bad
    part = tmp / "badpart"
    shutil.copytree(trace_dir, part)
    first = sorted((part / "parts").iterdir())[0]
    first.write_bytes(b"PAR1 this is not parquet")
    out["corrupt parquet part"] = part
    return out


ARGS = {
    "info": [], "summary": [], "states": [], "predict": [], "backtest": [], "plan": [], "report": [],
    "plot": [], "export": ["OUT.npy"],
}


@pytest.fixture(scope="module")
def broken(trace_dir, tmp_path_factory):
    return _broken_traces(trace_dir, tmp_path_factory.mktemp("broken"))


@pytest.mark.parametrize("cmd", list(ARGS))
@pytest.mark.parametrize("case", ["missing dir", "not a trace", "a file", "corrupt manifest", "corrupt parquet part"])
def test_broken_trace_gives_exit_2_and_one_line(cmd, case, broken, tmp_path):
    path = broken[case]
    extra = [str(tmp_path / a) if a.startswith("OUT") else a for a in ARGS[cmd]]
    if cmd == "report":
        extra = ["-o", str(tmp_path / "r.html")]
    elif cmd == "plot":
        extra = ["-o", str(tmp_path / "figs")]
    r = runner.invoke(app, [cmd, str(path), *extra])
    one_line_error(r, str(path))


@pytest.mark.parametrize(
    "args,needle",
    [
        (["summary", "{t}", "--steps", "50:10"], "stop (10) must be greater than start (50)"),
        (["states", "{t}", "--steps", "abc"], "expected START:STOP"),
        (["export", "{t}", "{o}/x.npy", "--steps", "500:600"], "no recorded training steps"),
        (["summary", "{t}", "--layers", "7"], "layer index 7 out of range"),
        (["summary", "{t}", "--layers", "no.such.layer"], "no layer named"),
        (["predict", "{t}", "--predictor", "oracle"], "unknown name 'oracle'"),
        (["predict", "{t}", "-p", "window"], "expected KEY=VALUE"),
        (["predict", "{t}", "--at", "0"], "no recorded step before it"),
        (["backtest", "{t}", "--predictors", "last,oracle"], "unknown ['oracle']"),
        (["backtest", "{t}", "--horizons", "10,x"], "comma-separated integers"),
        (["plan", "{t}", "--policy", "magic"], "unknown 'magic'"),
        (["plan", "{t}", "--gpus", "3"], ""),
        (["plan", "{t}", "--option", "nonsense=1"], "nonsense"),
        (["states", "{t}", "--method", "oracle"], "unknown state detector"),
        (["export", "{t}", "{o}/x.parquet"], "unknown output format"),
        (["export", "{t}", "{o}/x.npy", "--what", "tokens"], "--what"),
        (["plot", "{t}", "pie", "-o", "{o}"], "unknown"),
        (["plot", "{t}", "--format", "gif", "-o", "{o}"], "--format"),
        (["import", "bogus", "{o}/a.csv", "{o}/t"], "unknown 'bogus'"),
        (["import", "csv", "{o}/missing.csv", "{o}/t"], "missing.csv: no such file"),
        (["import", "csv", "{t}", "{o}/t2"], "is a directory; give the CSV file"),
        (["import", "csv", "{t}/manifest.json", "{o}/t2"], "not a readable CSV"),
        (["import", "numpy", "{o}/missing.npy", "{o}/t3", "--num-experts", "4"], "do not apply"),
    ],
)
def test_bad_arguments_give_exit_2_and_one_line(args, needle, trace_dir, tmp_path):
    r = runner.invoke(app, [a.format(t=trace_dir, o=tmp_path) for a in args])
    one_line_error(r, needle)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--bogus"], "No such option: --bogus"),
        (["predcit", "x"], "No such command 'predcit'"),
        (["info"], "Missing argument"),
        (["predict", "{t}", "--horizon", "0"], "--horizon"),
        (["summary", "{t}", "--no-such-flag"], "No such option"),
    ],
)
def test_usage_errors_are_one_line_too(args, needle, trace_dir):
    one_line_error(runner.invoke(app, [a.format(t=trace_dir) for a in args]), needle)


def test_import_malformed_file_names_the_line(tmp_path):
    src = tmp_path / "router_trace_rank0.jsonl"
    src.write_text('{"step": 0, "layer": 0, "top_indices": [[1, 2]]}\n{"step": 1, "layer": 0, "top_indices": [[1, 2]\n')
    r = runner.invoke(app, ["import", "megatron-router-trace", str(src), str(tmp_path / "t")])
    one_line_error(r, "router_trace_rank0.jsonl:2", "not valid JSON")
    r = runner.invoke(app, ["import", "megatron-router-trace", str(tmp_path), str(tmp_path / "t")])
    one_line_error(r, "not valid JSON")
