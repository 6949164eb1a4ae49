"""CLI-level trust: outputs never land inside the input trace, sizes from options are bounded,
imports do not guess top-k, forecast figures name their layer (issue 13)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from _cli import one_line_error
from typer.testing import CliRunner

from moeload.cli import app
from moeload.trace import Manifest, TraceWriter, open_trace

runner = CliRunner()
LAYERS = ["blocks.0.moe.gate", "blocks.1.moe.gate", "blocks.2.moe.gate", "blocks.3.moe.gate"]
E = 8


def make_trace(path: Path, steps: int = 80, seed: int = 0) -> Path:
    """A real trace on disk: 4 layers x 8 experts, top-2, two parts."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(E, 2.0), size=len(LAYERS))
    c = np.stack([[rng.multinomial(2048, p[li]) for li in range(len(LAYERS))] for _ in range(steps)]).astype(np.int64)
    m = Manifest(layers=LAYERS, experts_per_layer=E, top_k=2, framework="synthetic", tokens_per_step=1024,
                 world_size=2, ep_size=2)
    with TraceWriter(path, m) as w:
        w.write_block(np.arange(steps // 2), c[: steps // 2])
        w.write_block(np.arange(steps // 2, steps), c[steps // 2 :])
    return path


def digest(trace: Path) -> dict[str, str]:
    """Every file of a trace directory -> sha256 of its bytes."""
    return {str(p.relative_to(trace)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(trace.rglob("*")) if p.is_file()}


def invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def trace(tmp_path) -> Path:
    return make_trace(tmp_path / "run.moeload")


# ---------------------------------------------------------------- 1. outputs inside the input trace

def _part(t: Path) -> Path:
    return sorted((t / "parts").iterdir())[0]


@pytest.mark.parametrize(
    "args",
    [
        ["plan", "{t}", "--gpus", "2", "-o", "{t}/manifest.json"],
        ["export", "{t}", "{t}/manifest.json", "--format", "csv"],
        ["export", "{t}", "{t}/parts/x.npy"],
        ["backtest", "{t}", "--predictors", "last", "-o", "{part}"],
        ["predict", "{t}", "-o", "{t}/parts/f.npy"],
        ["predict", "{t}", "-o", "{t}/../run.moeload/manifest.json"],
        ["report", "{t}", "-o", "{t}/report.html"],
        ["plot", "{t}", "heatmap", "-o", "{t}"],
        ["plot", "{t}", "heatmap", "-o", "{t}/figs"],
    ],
)
def test_outputs_inside_the_input_trace_are_refused_and_the_trace_is_untouched(trace, args):
    before = digest(trace)
    r = invoke(*[a.format(t=trace, part=_part(trace)) for a in args])
    one_line_error(r, "inside the input trace")
    assert digest(trace) == before
    assert not (trace / "figs").exists()


def test_output_through_a_symlink_into_the_trace_is_refused(trace, tmp_path):
    link = tmp_path / "alias"
    os.symlink(trace, link)
    before = digest(trace)
    one_line_error(invoke("export", trace, link / "manifest.json", "--format", "csv"), "inside the input trace")
    assert digest(trace) == before


def test_report_default_output_inside_the_trace_is_refused(trace, monkeypatch):
    monkeypatch.chdir(trace)  # the default <name>.html would land in the trace directory
    one_line_error(invoke("report", "."), "inside the input trace")
    assert not list(trace.glob("*.html"))


def test_outputs_next_to_the_trace_still_work(trace, tmp_path):
    r = invoke("export", trace, tmp_path / "run.moeload.csv")  # a sibling whose name starts like the trace
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run.moeload.csv").stat().st_size > 0
    assert open_trace(trace).counts().shape == (80, 4, E)


# ---------------------------------------------------------------- 2. bounds on options

@pytest.mark.parametrize("cmd", [["predict"], ["plan", "--gpus", "2"], ["plot", "forecast", "-o", "{o}"]])
def test_forecast_origin_past_the_end_is_refused(trace, tmp_path, cmd):
    args = [a.format(o=tmp_path / "figs") for a in cmd]
    one_line_error(invoke(args[0], trace, *args[1:], "--at", "500"), "--at 500", "past the end", "0..79")
    one_line_error(invoke(args[0], trace, *args[1:], "--at", "0"), "--at 0", "no recorded step before it")


def test_forecast_origin_at_the_end_is_the_default(trace):
    r = invoke("predict", trace, "--at", "80", "--horizon", "5", "--json")
    assert r.exit_code == 0, r.output
    import json

    assert json.loads(r.stdout)["origin"] == 80


@pytest.mark.parametrize("cmd", ["predict", "plan", "report"])
def test_huge_horizon_is_refused_with_its_estimate_before_allocating(trace, tmp_path, cmd):
    extra = ["--gpus", "2"] if cmd == "plan" else (["-o", tmp_path / "r.html"] if cmd == "report" else [])
    r = invoke(cmd, trace, "--horizon", "1000000000", *extra)
    line = one_line_error(r, "--horizon 1000000000", "238.4 GiB", "horizon x layers x experts x 8 bytes")
    assert "2.0 GiB" in line


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--gpus", "2", "--replicas", "1000000000"], "--replicas 1000000000: would need about 238.4 GiB"),
        (["--gpus", "2", "--replicas", "100000", "--policy", "balanced"], "74.5 GiB (replicas^2"),
        (["--gpus", "2", "--replicas", "100000", "--policy", "exact"], "74.5 GiB (replicas^2"),
        (["--gpus", "2", "--replicas", "4"], "fewer slots than the 8 experts"),
        (["--gpus", "3", "--replicas", "16"], "--replicas 16: not a multiple of 3 GPUs"),
        (["--gpus", "3"], "3 GPUs do not divide the 8 experts"),
        (["--gpus", "1000000000"], "1000000000 GPUs do not divide the 8 experts"),
    ],
)
def test_plan_slot_counts_are_checked_before_fitting(trace, args, needle):
    one_line_error(invoke("plan", trace, *args, "--predictor", "arima"), needle)


def test_plan_with_replicas_within_bounds_still_plans(trace):
    import json

    r = invoke("plan", trace, "--gpus", "2", "--replicas", "12", "--policy", "balanced", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["num_replicas"] == 12 and np.asarray(d["replica_counts"]).sum(1).tolist() == [12] * 4


def _csv(path: Path) -> Path:
    rows = ["step,layer,expert,count"] + [f"{s},{li},{e},{10 + s + e}" for s in range(3) for li in range(2) for e in range(4)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_csv_import_without_top_k_is_refused_and_writes_nothing(tmp_path):
    src = _csv(tmp_path / "c.csv")
    one_line_error(invoke("import", "csv", src, tmp_path / "t"), "c.csv", "give --top-k")
    assert not (tmp_path / "t").exists()


def test_numpy_import_without_top_k_is_refused_too(tmp_path):
    src = tmp_path / "c.npy"
    np.save(src, np.ones((3, 2, 4), dtype=np.int64))
    one_line_error(invoke("import", "numpy", src, tmp_path / "t"), "c.npy", "give --top-k")
    assert not (tmp_path / "t").exists()


def test_csv_import_with_top_k_records_it(tmp_path):
    src = _csv(tmp_path / "c.csv")
    r = invoke("import", "csv", src, tmp_path / "t", "--top-k", "2")
    assert r.exit_code == 0, r.output
    t = open_trace(tmp_path / "t")
    assert t.top_k == [2, 2] and t.counts().shape == (3, 2, 4)


# ---------------------------------------------------------------- 3. the forecast figure names its layer

def test_plot_forecast_titles_each_figure_with_its_own_layer(trace, tmp_path):
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none"}):  # keep titles as text in the SVG
        r = invoke("plot", trace, "forecast", "--layers", "0,3", "--at", "60", "--horizon", "10", "-o", tmp_path,
                   "--format", "svg")
    assert r.exit_code == 0, r.output
    svg0 = (tmp_path / "forecast-layer0.svg").read_text()
    svg3 = (tmp_path / "forecast-layer3.svg").read_text()
    assert "layer 0 (blocks.0.moe.gate)" in svg0 and "blocks.3" not in svg0
    assert "layer 3 (blocks.3.moe.gate)" in svg3 and "layer 0" not in svg3


def test_report_forecast_figures_name_their_layers(trace, tmp_path, monkeypatch):
    from moeload.cli import figures

    titles: list[str] = []
    real_png = figures._png

    def spy(fig):  # records each embedded figure's title, then embeds it as usual
        titles.append(fig.axes[0].get_title(loc="left"))
        return real_png(fig)

    monkeypatch.setattr(figures, "_png", spy)
    r = invoke("report", trace, "--layers", "1,2", "-o", tmp_path / "r.html", "--at", "60", "--horizon", "10")
    assert r.exit_code == 0, r.output
    fc = [x for x in titles if x.startswith("Forecast of")]
    assert len(fc) == 2
    assert "layer 1 (blocks.1.moe.gate)" in fc[0] and "layer 2 (blocks.2.moe.gate)" in fc[1]


def test_forecast_plot_of_one_layer_arrays_does_not_invent_layer_0():
    import matplotlib

    matplotlib.use("Agg")
    from moeload import plots

    p = np.full((30, E), 1 / E)
    assert "layer" not in plots.forecast_vs_actual(p[:20], p[20:]).get_title(loc="left")
    p3 = np.full((30, 4, E), 1 / E)
    assert plots.forecast_vs_actual(p3[:20], p3[20:], layer=2).get_title(loc="left").endswith("layer 2")


# ---------------------------------------------------------------- Python warnings: one line, after success only

def test_a_failing_command_prints_one_line_even_when_code_warned_first(trace):
    # evaluation.backtest warns that the horizon outruns the trace, then no origin fits
    one_line_error(invoke("backtest", trace, "--horizons", "1000000000"), "longer than the")


def test_warnings_of_a_successful_command_are_one_moeload_line_each(trace):
    r = invoke("backtest", trace, "--predictors", "last", "--horizons", "8,1000000000")
    assert r.exit_code == 0, r.output
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("moeload: warning: backtest: horizon 1000000000 is longer"), lines
    assert "UserWarning" not in r.stderr and ".py:" not in r.stderr


@pytest.mark.parametrize("opt", ["--num-experts", "--top-k"])
def test_import_size_options_are_bounded_before_reading(tmp_path, opt):
    src = _csv(tmp_path / "c.csv")
    extra = ["--top-k", "2"] if opt != "--top-k" else []
    one_line_error(invoke("import", "csv", src, tmp_path / "t", opt, "10000000000", *extra),
                   f"{opt} 10000000000: implausibly large")
    assert not (tmp_path / "t").exists()


def test_plan_prints_the_placement_it_made(trace):
    import json

    d = json.loads(invoke("plan", trace, "--gpus", "2", "--replicas", "10", "--json").stdout)
    out = invoke("plan", trace, "--gpus", "2", "--replicas", "10").stdout
    p = np.asarray(d["phy2log"])  # [4 layers, 10 slots], slots 0..4 on GPU0, 5..9 on GPU1
    for li in range(4):
        want = f"layer {li}: GPU0 [{' '.join(map(str, p[li, :5]))}] GPU1 [{' '.join(map(str, p[li, 5:]))}]"
        assert want in out, (want, out)


def test_plot_all_includes_gpu_load_on_an_expert_parallel_trace(trace, tmp_path):
    r = invoke("plot", trace, "all", "-o", tmp_path / "figs", "--horizon", "10")
    assert r.exit_code == 0, r.output
    got = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert got == ["backtest.png", "fluctuation.png", "forecast-layer0.png", "gpu-load-layer0.png",
                   "heatmap-layer0.png", "proportions-layer0.png"]


def test_plot_gpu_load_titles_name_the_layer_drawn(trace, tmp_path):
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none"}):
        r = invoke("plot", trace, "gpu-load", "--layers", "0,3", "-o", tmp_path, "--format", "svg")
    assert r.exit_code == 0, r.output
    assert "Per-GPU load, layer 3," in (tmp_path / "gpu-load-layer3.svg").read_text()
    assert "Per-GPU load, layer 0," in (tmp_path / "gpu-load-layer0.svg").read_text()
