"""Figures: each renders with the Agg backend; axes, labels and data extents are checked, and a
100k-step input renders in under 2 CPU seconds with a note that it was averaged over step bins."""

from __future__ import annotations

import subprocess
import sys
import time

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PolyCollection, QuadMesh  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from moeload import evaluation, open_trace, placement, plots, states  # noqa: E402
from moeload.errors import InputError  # noqa: E402
from moeload.trace import Manifest, TraceWriter  # noqa: E402

S, L, E = 1200, 3, 8


def synth_counts(S: int, L: int, E: int, seed: int = 0, tokens: int = 2048, top_k: int = 2) -> np.ndarray:
    """[S, L, E] counts: a drifting router whose volatility decays (transient), then sampling noise."""
    rng = np.random.default_rng(seed)
    vol = 0.08 * np.exp(-np.arange(S) / (0.08 * S)) + 0.002
    logits = np.cumsum(rng.normal(size=(S, L, E)) * vol[:, None, None], axis=0) + rng.normal(0, 0.6, (1, L, E))
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return rng.multinomial(tokens * top_k, p.reshape(-1, E)).reshape(S, L, E)


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("plots") / "synthetic.moeload"
    counts = synth_counts(S, L, E)
    m = Manifest(layers=[f"blocks.{i}.moe.gate" for i in range(L)], experts_per_layer=E, top_k=2,
                 framework="synthetic", ep_size=4)
    with TraceWriter(path, m, fsync=False) as w:
        for a in range(0, S, 500):
            w.write_block(np.arange(a, min(a + 500, S)) + 10, counts[a : a + 500])  # steps 10..1209
    return open_trace(path)


@pytest.fixture(scope="module")
def big():
    """[100_000, 2, 8] proportions."""
    c = synth_counts(100_000, 2, E, seed=1)
    return c / c.sum(-1, keepdims=True)


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def notes(ax) -> list[str]:
    return [t.get_text() for t in ax.texts if t.get_gid() == "moeload-note"]


def lines_labelled(ax, prefix: str) -> list:
    return [ln for ln in ax.get_lines() if ln.get_label().startswith(prefix)]


def timed_render(fn) -> tuple[object, float]:
    """Build and draw a figure -> (figure or axes, CPU seconds). CPU time of this process, not wall
    time: the test machine is shared, and waiting for a core is not the figure's cost."""
    t0 = time.process_time()
    out = fn()
    (out if isinstance(out, Figure) else out.figure).canvas.draw()
    return out, time.process_time() - t0


# ---- load_heatmap ----------------------------------------------------------------------------
def test_heatmap_from_trace(trace):
    ax = plots.load_heatmap(trace, layer=1)
    assert len(ax.images) == 1
    img = ax.images[0]
    assert img.colorbar is not None and img.colorbar.ax.get_ylabel() == "share of routed tokens (%)"
    x0, x1 = ax.get_xlim()
    assert x0 <= 10 and x1 >= 1209 and x1 - x0 < 1202
    assert ax.get_ylim() == (-0.5, E - 0.5)
    assert img.get_array().shape == (E, S)
    p = trace.proportions(layers=[1])[:, 0]
    np.testing.assert_allclose(img.get_array()[:, 0], 100 * p[0])
    assert "blocks.1.moe.gate" in ax.get_title(loc="left")
    assert ax.get_xlabel() == "training step" and ax.get_ylabel() == "expert"
    assert not any("bins" in n for n in notes(ax))


def test_heatmap_step_selection_and_given_axes(trace):
    fig, ax = plt.subplots()
    out = plots.load_heatmap(trace, ax=ax, layer="blocks.2.moe.gate", steps=(100, 300))
    assert out is ax
    assert out.images[0].get_array().shape == (E, 200)
    x0, x1 = ax.get_xlim()
    assert x0 == pytest.approx(99.5) and x1 == pytest.approx(299.5)


def test_heatmap_long_input_is_binned_and_fast(big):
    ax, dt = timed_render(lambda: plots.load_heatmap(big, layer=1))
    arr = ax.images[0].get_array()
    assert arr.shape == (E, plots.MAX_POINTS)
    np.testing.assert_allclose(arr[:, 0], 100 * big[:50, 1].mean(axis=0))
    assert any("mean over 50-step bins" in n for n in notes(ax))
    assert ax.get_xlim()[1] >= 99_999
    assert dt < 2.0, f"100k-step heatmap took {dt:.2f} CPU s"


def test_heatmap_uneven_steps_use_a_mesh():
    p = np.full((4, 3), 1 / 3)
    ax = plots.load_heatmap(p, steps=[0, 1, 5, 6])
    assert not ax.images and any(isinstance(cl, QuadMesh) for cl in ax.collections)
    assert ax.get_xlim()[1] >= 6


def test_heatmap_colour_scale_clips_a_rare_hot_spot():
    p = np.full((400, 64), 1 / 64)
    p[:80] = 0.5 / 63
    p[:80, 0] = 0.5  # one expert holds half the load for 80 steps: 0.3% of the cells
    ax = plots.load_heatmap(p)
    vmin, vmax = ax.images[0].get_clim()
    assert vmin == 0 and vmax < 50 and ax.images[0].colorbar.extend == "max"
    ax2 = plots.load_heatmap(p, vmax=60.0)
    assert ax2.images[0].get_clim()[1] == 60.0 and ax2.images[0].colorbar.extend == "neither"


def test_heatmap_rejects_bad_input():
    with pytest.raises(InputError, match="load_heatmap: data"):
        plots.load_heatmap(np.zeros(5))
    with pytest.raises(InputError, match="steps"):
        plots.load_heatmap(np.full((5, 2), 0.5), steps=[0, 1, 2])


# ---- proportions_over_time -------------------------------------------------------------------
def test_proportions_lines_and_phases(trace):
    r = states.detect(trace)
    ax = plots.proportions_over_time(trace, labels=r, layer=0)
    assert len(lines_labelled(ax, "expert ")) == E
    assert len(lines_labelled(ax, "uniform")) == 1
    shades = {cl.get_label(): cl for cl in ax.collections if isinstance(cl, PolyCollection)}
    assert set(shades) == {"transient phase", "stable phase"}
    # the stable shading starts where the detector says layer 0's final stable phase starts
    starts = [path.vertices[:, 0].min() for path in shades["stable phase"].get_paths()]
    assert max(starts) == pytest.approx(r.boundaries[0] - 0.5, abs=1.0)
    assert ax.get_xlim()[0] <= 10 and ax.get_xlim()[1] >= 1209
    assert ax.get_ylabel() == "share of routed tokens (%)"
    assert ax.get_legend() is not None


def test_proportions_subset_and_label_checks():
    p = np.full((20, 4), 0.25)
    ax = plots.proportions_over_time(p, steps=np.arange(100, 120), experts=[1, 3])
    assert [ln.get_label() for ln in lines_labelled(ax, "expert")] == ["expert 1", "expert 3"]
    np.testing.assert_allclose(lines_labelled(ax, "expert 1")[0].get_ydata(), 25.0)
    with pytest.raises(InputError, match="labels"):
        plots.proportions_over_time(p, labels=np.ones(7, bool))
    with pytest.raises(InputError, match="experts"):
        plots.proportions_over_time(p, experts=[4])


def test_proportions_long_input_is_binned_and_fast(big):
    labels = np.arange(len(big)) > 30_000
    ax, dt = timed_render(lambda: plots.proportions_over_time(big, labels=labels, layer=0))
    for ln in lines_labelled(ax, "expert"):
        assert len(ln.get_xdata()) <= plots.MAX_POINTS
    assert any("mean over 50-step bins" in n for n in notes(ax))
    assert ax.get_xlim()[1] >= 99_999
    assert dt < 2.0, f"100k-step proportions took {dt:.2f} CPU s"


# ---- fluctuation -----------------------------------------------------------------------------
def brute_fluct(p, w, stat, agg, min_periods=None):
    """The window rule's statistic by its definition: per expert over the trailing w steps, steps
    without tokens (NaN rows) skipped, range or sample variance (ddof=1), in shares."""
    S = len(p)
    mp = max(2, w // 2) if min_periods is None else min_periods
    out = np.full(p.shape[:2], np.nan)
    for t in range(w - 1, S):
        for li in range(p.shape[1]):
            win = p[t - w + 1 : t + 1, li]
            win = win[~np.isnan(win).all(1)]
            if len(win) < mp:
                continue
            v = win.max(0) - win.min(0) if stat == "range" else win.var(0, ddof=1)
            out[t, li] = v.mean(-1) if agg == "mean" else v.max(-1)
    return out


@pytest.mark.parametrize("stat", ["range", "var"])
@pytest.mark.parametrize("agg", ["mean", "max"])
@pytest.mark.parametrize("w", [4, 7])
def test_rolling_fluctuation_matches_brute_force(stat, agg, w):
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(5), size=(30, 2))
    np.testing.assert_allclose(plots.rolling_fluctuation(p, w, stat, agg), brute_fluct(p, w, stat, agg), atol=1e-12)


def test_rolling_fluctuation_skips_rows_without_tokens_as_the_detector():
    rng = np.random.default_rng(4)
    p = rng.dirichlet(np.ones(3), size=(12, 1))
    q = p.copy()
    q[5] = np.nan
    q[8:11] = np.nan  # window 3 ending at step 10 has a single step with tokens: NaN
    got = plots.rolling_fluctuation(q, 3)
    np.testing.assert_allclose(got, brute_fluct(q, 3, "range", "mean"), atol=1e-12)
    assert np.isnan(got[10, 0]) and np.isfinite(got[7, 0])
    with pytest.raises(InputError, match="window"):
        plots.rolling_fluctuation(p, 1)
    with pytest.raises(InputError, match="var"):
        plots.rolling_fluctuation(p, 3, "std")  # the detector has no std: a figure of it would disagree


def test_rolling_fluctuation_leaves_out_padded_experts():
    rng = np.random.default_rng(5)
    p = np.zeros((25, 2, 6))
    p[:, 0] = rng.dirichlet(np.ones(6), size=25)
    p[:, 1, :4] = rng.dirichlet(np.ones(4), size=25)  # layer 1 has 4 experts, 2 padding columns
    got = plots.rolling_fluctuation(p, 5, experts=[6, 4])
    np.testing.assert_allclose(got[:, 1], brute_fluct(p[:, 1:, :4], 5, "range", "mean")[:, 0], atol=1e-12)
    np.testing.assert_allclose(got[:, 0], brute_fluct(p[:, :1], 5, "range", "mean")[:, 0], atol=1e-12)
    with pytest.raises(InputError, match="experts"):
        plots.rolling_fluctuation(p, 5, experts=[6, 7])


@pytest.mark.parametrize("stat,agg", [("range", "mean"), ("var", "mean"), ("var", "max")])
def test_figure_statistic_is_the_detectors_on_a_trace(trace, stat, agg):
    """The figure of a trace and the figure of `states.detect` on it draw the same numbers."""
    r = states.detect(trace, method="window", window=50, stat=stat, agg=agg)
    got = plots.rolling_fluctuation(trace.proportions(), 50, stat, agg, trace.experts_per_layer)
    np.testing.assert_array_equal(got, r.fluctuation)
    assert np.isfinite(got[49:]).all()
    from_trace = plots.fluctuation(trace, window=50, stat=stat, agg=agg, log=False)
    plt.close("all")
    from_states = plots.fluctuation(r, log=False)
    for li in range(L):
        a = [ln for ln in from_trace.get_lines() if ln.get_label().startswith(f"{li}:")][0].get_ydata()
        b = lines_labelled(from_states, f"layer {li}")[0].get_ydata()
        np.testing.assert_array_equal(a, b)


def test_fluctuation_from_trace_with_boundaries(trace):
    ax = plots.fluctuation(trace, window=50, boundaries=[300, -1, 500])
    vlines = [ln for ln in ax.get_lines() if "stable from" in ln.get_label()]
    layer_lines = [ln for ln in ax.get_lines() if ln.get_label().startswith(("0:", "1:", "2:")) and ln not in vlines]
    assert len(layer_lines) == L
    assert sorted(ln.get_xdata()[0] for ln in vlines) == [300, 500]
    assert ax.get_yscale() == "log"
    assert ax.get_xlim()[0] <= 10 and ax.get_xlim()[1] >= 1209
    assert "rolling range (share)" in ax.get_ylabel()
    assert any("trailing window of 50" in n for n in notes(ax))


def test_fluctuation_from_state_result(trace):
    r = states.detect(trace)
    ax = plots.fluctuation(r)
    vl = [ln for ln in ax.get_lines() if "stable from" in ln.get_label()]
    assert sorted(ln.get_xdata()[0] for ln in vl) == sorted(b for b in r.boundaries.tolist() if b >= 0)
    assert lines_labelled(ax, "threshold")
    assert "(share)" in ax.get_ylabel()


def test_fluctuation_of_a_given_statistic_and_errors():
    stat = np.linspace(1, 0.1, 40)[:, None] * np.array([[1.0, 2.0]])
    ax = plots.fluctuation(stat, boundaries=[20, 30], log=False, layer_names=["a", "b"])
    np.testing.assert_allclose(lines_labelled(ax, "b")[0].get_ydata(), stat[:, 1])
    assert ax.get_yscale() == "linear"
    with pytest.raises(InputError, match="boundaries"):
        plots.fluctuation(stat, boundaries=[1, 2, 3])
    with pytest.raises(InputError, match="stat"):
        plots.fluctuation(np.full((10, 1, 2), 0.5), stat="iqr")


def test_fluctuation_long_input_is_binned_and_fast(big):
    ax, dt = timed_render(lambda: plots.fluctuation(big, boundaries=[30_000, 40_000]))
    assert all(len(ln.get_xdata()) <= plots.MAX_POINTS for ln in lines_labelled(ax, "layer"))
    assert any("mean over 50-step bins" in n for n in notes(ax))
    assert dt < 2.0, f"100k-step fluctuation took {dt:.2f} CPU s"


# ---- forecast_vs_actual ----------------------------------------------------------------------
def test_forecast_vs_actual(trace):
    from moeload import predictors

    p = trace.proportions()
    o, H = 900, 200
    f = predictors.get("sw_avg", window=100).fit(p[:o]).predict(H)
    ax = plots.forecast_vs_actual(p[:o], f, p[o : o + H], layer=2)
    experts = lines_labelled(ax, "expert ")
    assert len(experts) == 4
    top4 = sorted(np.argsort(-f[:, 2].mean(0))[:4].tolist())
    assert [int(ln.get_label().split()[1]) for ln in experts] == top4
    assert len([cl for cl in ax.collections if isinstance(cl, PolyCollection)]) == 4  # error bands
    x0, x1 = ax.get_xlim()
    assert x0 <= o - 3 * H and x1 >= o + H - 1
    mae = 100 * np.abs(f[:, 2] - p[o : o + H, 2]).mean()
    assert f"MAE {mae:.2f} pp" in ax.get_title(loc="left")
    assert lines_labelled(ax, "forecast origin")[0].get_xdata()[0] == pytest.approx(o - 0.5)


def test_forecast_band_without_actual_and_errors():
    hist = np.full((50, 3), 1 / 3)
    fc = np.full((10, 3), 1 / 3)
    ax = plots.forecast_vs_actual(hist, fc, band=np.full(3, 0.02), experts=[0], start=1000)
    band = [cl for cl in ax.collections if isinstance(cl, PolyCollection)]
    assert len(band) == 1
    ys = band[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(100 / 3 - 2) and ys.max() == pytest.approx(100 / 3 + 2)
    assert ax.get_xlim()[1] >= 1059
    with pytest.raises(InputError, match="expected \\[H, E\\]"):
        plots.forecast_vs_actual(hist, np.full((10, 4), 0.25))
    with pytest.raises(InputError, match="band"):
        plots.forecast_vs_actual(hist, fc, band=np.full(4, 0.1))


def test_forecast_long_history_is_binned_and_fast(big):
    ax, dt = timed_render(lambda: plots.forecast_vs_actual(big[:90_000], big[90_000:], big[90_000:], context=90_000))
    assert all(len(ln.get_xdata()) <= plots.MAX_POINTS for ln in ax.get_lines())
    assert any("bins" in n for n in notes(ax))
    assert dt < 2.0, f"100k-step forecast figure took {dt:.2f} CPU s"


# ---- backtest_errors -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backtest_df(trace):
    return evaluation.backtest(trace, predictors=["last", "sw_avg", "ema"], horizons=(50, 150), every=100)


def test_backtest_errors_bars_match_means(backtest_df):
    ax = plots.backtest_errors(backtest_df)
    assert len(ax.patches) == 3 * 2
    means = backtest_df.groupby(["predictor", "horizon"])["havg_mae_pp"].mean()
    names = [t.get_text() for t in ax.get_xticklabels()]
    assert sorted(names) == ["ema", "last", "sw_avg"]
    order = backtest_df.groupby("predictor")["havg_mae_pp"].mean().sort_values().index.tolist()
    assert names == order
    heights = sorted(round(b.get_height(), 9) for b in ax.patches)
    assert heights == sorted(round(v, 9) for v in means.to_numpy())
    assert ax.get_ylabel().endswith("(pp)")
    assert ax.get_legend() is not None and any("standard error" in n for n in notes(ax))


def test_backtest_errors_per_phase_and_summary(backtest_df):
    phases = set(backtest_df["phase"])
    ax = plots.backtest_errors(backtest_df, phase=None)
    assert len(ax.patches) == 3 * 2 * (len(phases) + 1)
    s = evaluation.summarize(backtest_df)
    ax2 = plots.backtest_errors(s, metric="mae_pp")
    want = s[s["phase"] == "all"]["mae_pp"].to_numpy()
    assert sorted(b.get_height() for b in ax2.patches) == pytest.approx(sorted(want))


def test_backtest_errors_rejects_bad_frames(backtest_df):
    with pytest.raises(InputError, match="lacks column"):
        plots.backtest_errors(backtest_df.drop(columns=["horizon"]))
    with pytest.raises(InputError, match="no rows"):
        plots.backtest_errors(backtest_df.iloc[:0])
    with pytest.raises(InputError, match="phase='warmup'"):
        plots.backtest_errors(backtest_df, phase="warmup")
    with pytest.raises(InputError, match="DataFrame"):
        plots.backtest_errors(backtest_df.to_dict())


# ---- gpu_load --------------------------------------------------------------------------------
def test_gpu_load_one_run(trace):
    loads = trace.gpu_loads(layers=[0])[:, 0]  # [S, 4]
    fig = plots.gpu_load(loads, steps=trace.steps).figure
    top, bottom = fig.axes
    assert len(lines_labelled(top, "GPU ")) == 4
    imb = lines_labelled(bottom, "imbalance")[0]
    np.testing.assert_allclose(imb.get_ydata(), loads.max(1) / loads.mean(1))
    assert bottom.get_xlim()[0] <= 10 and bottom.get_xlim()[1] >= 1209
    assert "max / mean" in bottom.get_ylabel() and "tokens" in top.get_ylabel()


def test_gpu_load_before_after_a_placement(trace):
    c = trace.counts()
    w = c[:600].mean(0)
    old = placement.plan(w, num_gpus=4, num_replicas=8, policy="contiguous")
    new = placement.plan(w, num_gpus=4, num_replicas=8, policy="eplb")
    before, after = old.evaluate(c[600:]), new.evaluate(c[600:])
    fig = plots.gpu_load(before=before, after=after, steps=trace.steps[600:], layer=1).figure
    top, bottom = fig.axes
    assert len(lines_labelled(top, "before: busiest")) == 1 and len(lines_labelled(top, "after: busiest")) == 1
    b_line, a_line = lines_labelled(bottom, "before")[0], lines_labelled(bottom, "after")[0]
    np.testing.assert_allclose(b_line.get_ydata(), before.imbalance[:, 1])
    np.testing.assert_allclose(a_line.get_ydata(), after.imbalance[:, 1])
    assert f"mean {after.imbalance[:, 1].mean():.3g}" in a_line.get_label()


def test_gpu_load_imbalance_series_and_errors():
    imb = np.linspace(2.0, 1.1, 30)
    fig = plots.gpu_load(before=imb, after=np.full(30, 1.05)).figure
    assert len(fig.axes) == 1
    np.testing.assert_allclose(lines_labelled(fig.axes[0], "before")[0].get_ydata(), imb)
    with pytest.raises(InputError, match="give loads"):
        plots.gpu_load()
    with pytest.raises(InputError, match="not both"):
        plots.gpu_load(np.ones((3, 2)), after=np.ones((3, 2)))
    with pytest.raises(InputError, match="different numbers of steps"):
        plots.gpu_load(before=np.ones((3, 2)), after=np.ones((4, 2)))
    with pytest.raises(InputError, match="non-negative"):
        plots.gpu_load(-np.ones((3, 2)))


def test_gpu_load_long_input_is_binned_and_fast(big):
    loads = (big[:, 0].reshape(-1, 4, 2).sum(-1) * 4096)  # [100k, 4]
    fig, dt = timed_render(lambda: plots.gpu_load(loads).figure)
    assert all(len(ln.get_xdata()) <= plots.MAX_POINTS for ln in fig.axes[0].get_lines())
    assert any("mean over 50-step bins" in n for n in notes(fig.axes[0]))
    assert dt < 2.0, f"100k-step gpu_load took {dt:.2f} CPU s"


# ---- package -----------------------------------------------------------------------------------
def test_importing_plots_does_not_import_matplotlib():
    code = "import sys, moeload.plots; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gpu_load_of_replays(trace):
    c = trace.counts()
    static = placement.replay(c, num_gpus=4, num_replicas=8, policy="contiguous", replan_every=len(c))
    replanned = placement.replay(c, num_gpus=4, num_replicas=12, policy="eplb", replan_every=200, window=200)
    fig = plots.gpu_load(before=static, after=replanned, steps=trace.steps, layer=2, labels=("static", "eplb")).figure
    (ax,) = fig.axes
    np.testing.assert_allclose(lines_labelled(ax, "static")[0].get_ydata(), static.step_imbalance[:, 2])
    np.testing.assert_allclose(lines_labelled(ax, "eplb")[0].get_ydata(), replanned.step_imbalance[:, 2])
    with pytest.raises(InputError, match="layer=5"):
        plots.gpu_load(static, layer=5)


def test_every_figure_function_returns_the_axes_it_drew_on():
    """The plotting rule fn(data, ax=None) -> Axes, gpu_load included (two panels: it returns the imbalance Axes)."""
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes

    loads = np.random.default_rng(0).integers(1, 100, size=(40, 4)).astype(float)
    ax = plots.gpu_load(loads)
    assert isinstance(ax, Axes) and len(ax.figure.axes) == 2
    fig, (top, bottom) = plt.subplots(2, 1)
    assert plots.gpu_load(loads, ax=(top, bottom)) is bottom and top.lines
    fig2, one = plt.subplots()
    assert plots.gpu_load(before=loads.max(1) / loads.mean(1), after=np.ones(40), ax=one) is one
    plt.close("all")
