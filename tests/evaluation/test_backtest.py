"""Rolling-origin backtests on series whose answers are known."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from moeload import evaluation, predictors
from moeload.errors import InputError
from tests.states.synth import proportions, routing_counts

METRICS = ["mae_pp", "rmse_pp", "mre", "havg_mae_pp", "maxload_err"]


def test_constant_series_has_zero_error():
    p = np.broadcast_to(np.array([0.4, 0.3, 0.2, 0.1]), (600, 2, 4)).copy()
    df = evaluation.backtest(p, predictors=["last", "sw_avg", "ema"], horizons=(50, 100), every=100, min_history=50)
    assert set(df["predictor"]) == {"last", "sw_avg", "ema"}
    assert len(df) == 3 * (6 + 5) * 2  # origins 50..550: 6 for H=50, 5 for H=100; 2 layers
    assert np.abs(df[METRICS].to_numpy()).max() < 1e-12
    assert df.attrs["origins_used"] == {50: 6, 100: 5} and df.attrs["origins_skipped"] == {50: 0, 100: 1}
    assert "horizon 100: 1 of 6 origins skipped" in df.attrs["notes"][0]


def test_piecewise_series_errors_by_hand():
    a, b = np.array([0.4, 0.3, 0.2, 0.1]), np.array([0.1, 0.2, 0.3, 0.4])
    p = np.concatenate([np.tile(a, (300, 1, 1)), np.tile(b, (300, 1, 1))])
    df = evaluation.backtest(p, predictors=["last"], horizons=(100, 200), origins=[300, 250],
                             phases=False, gpu_map=[0, 0, 1, 1])
    r = df.set_index(["origin", "horizon"])
    at300 = r.loc[(300, 100)]  # forecast a, truth b
    assert at300["mae_pp"] == pytest.approx(100 * np.abs(a - b).mean())
    assert at300["havg_mae_pp"] == pytest.approx(100 * np.abs(a - b).mean())
    assert at300["mre"] == pytest.approx((np.abs(a - b) / b).mean())
    assert at300["maxload_err"] == pytest.approx(abs(0.7 - 0.7) / 0.7)
    assert at300["phase"] == "all"
    # origin 250, H=100: 50 steps of a (no error), 50 of b
    at250 = r.loc[(250, 100)]
    assert at250["mae_pp"] == pytest.approx(0.5 * 100 * np.abs(a - b).mean())
    ybar = 0.5 * (a + b)
    assert at250["havg_mae_pp"] == pytest.approx(100 * np.abs(a - ybar).mean())
    assert at250["rmse_pp"] == pytest.approx(100 * np.sqrt(0.5 * ((a - b) ** 2).mean()))


def test_phase_split_and_summary():
    c = routing_counts(3000, L=2, transient=((0, 1000),), seed=7)
    df = evaluation.backtest(c, predictors=["last", "sw_avg", ("sw_avg", {"window": 300})], horizons=(200, 500),
                             every=100, min_history=100)
    tr = df[df.origin < 900]
    st = df[df.origin > 1300]
    assert (tr["phase"] == "transient").all() and (st["phase"] == "stable").all()
    s = evaluation.summarize(df)
    assert set(s["phase"]) == {"all", "stable", "transient"}
    sw = s[s.predictor == "sw_avg"]
    np.testing.assert_allclose(sw["havg_mae_pp_vs_sw_avg"], 1.0)
    # once the 300-step window is clear of the transient (noise around a fixed mean), a long
    # average beats a short one, which beats the last value
    late = evaluation.summarize(df[df.origin >= 1400])
    sst = late[(late.phase == "stable") & (late.horizon == 500)].set_index("predictor")
    assert sst.loc["sw_avg(window=300)", "havg_mae_pp"] < sst.loc["sw_avg", "havg_mae_pp"] < sst.loc["last", "havg_mae_pp"]
    assert (s["n_origins"] > 0).all()
    n_all = s[(s.predictor == "last") & (s.horizon == 200) & (s.phase == "all")]["n_origins"].item()
    assert n_all == df[(df.predictor == "last") & (df.horizon == 200)]["origin"].nunique()
    table = evaluation.format_table(df)
    assert "sw_avg(window=300)" in table and "havg_mae_pp" in table
    assert "transient" in evaluation.format_table(df, style="rich")


def test_incremental_equals_refit_and_instances_are_copied():
    p = proportions(routing_counts(1500, L=2, transient=((0, 500),), seed=8))
    inst = predictors.get("ema", halflife=50)
    kw = dict(horizons=(100, 300), every=150, min_history=100, phases=False)
    inc = evaluation.backtest(p, predictors=["last", "sw_avg", inst], **kw)
    ref = evaluation.backtest(p, predictors=["last", "sw_avg", inst], incremental=False, **kw)
    np.testing.assert_allclose(inc[METRICS].to_numpy(), ref[METRICS].to_numpy(), rtol=1e-9, atol=1e-12)
    assert not hasattr(inst, "cutoff_")  # the given instance stays unfitted


def test_trace_input_uses_steps_and_recorded_map(tmp_path):
    from moeload import open_trace
    from moeload.trace import Manifest, TraceWriter

    c = routing_counts(800, L=2, transient=(), seed=9)
    m = Manifest(layers=["a", "b"], experts_per_layer=[8, 8], top_k=2, framework="synthetic", ep_size=2,
                 expert_to_rank=[[0, 1] * 4, [0] * 4 + [1] * 4])
    with TraceWriter(tmp_path / "t.moeload", m) as w:
        w.write_block(np.arange(800) * 10, c)
    tr = open_trace(tmp_path / "t.moeload")
    df = evaluation.backtest(tr, predictors=["sw_avg"], horizons=(100,), origins=[2000, 5000], phases=False)
    assert sorted(df["origin"].unique()) == [2000, 5000]
    # maxload_err under the recorded map, recomputed from the trace's own GPU loads
    g = tr.gpu_loads()[500:600].sum(0)  # [L, G] realised loads after origin 5000 (index 500)
    f = predictors.get("sw_avg").fit(proportions(c)[:500]).predict(100).mean(0)
    fg = np.stack([[f[0, 0::2].sum(), f[0, 1::2].sum()], [f[1, :4].sum(), f[1, 4:].sum()]])
    yg = g / g.sum(-1, keepdims=True)
    expect = np.abs(fg.max(1) - yg.max(1)) / yg.max(1)
    got = df[df.origin == 5000].sort_values("layer")["maxload_err"].to_numpy()
    np.testing.assert_allclose(got, expect, rtol=1e-9)
    with pytest.raises(InputError, match="not recorded steps"):
        evaluation.backtest(tr, predictors=["last"], horizons=(10,), origins=[2005])


def test_horizon_longer_than_trace_is_reported():
    p = np.full((300, 1, 4), 0.25)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        df = evaluation.backtest(p, predictors=["last"], horizons=(50, 1000), every=50, min_history=50, phases=False)
    assert set(df["horizon"]) == {50}
    assert df.attrs["origins_used"][1000] == 0
    assert any("horizon 1000" in str(w.message) for w in rec)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"predictors": ["no_such_predictor"]}, "unknown name"),
        ({"predictors": [42]}, "predictors"),
        ({"horizons": (0,)}, "horizons"),
        ({"origins": [0]}, "origins"),
        ({"origins": [500]}, "origins"),
        ({"gpu_map": [0, 1]}, "gpu_map"),
        ({"phases": np.ones(7, bool)}, "phases"),
        ({"min_history": -1}, "min_history"),
    ],
)
def test_bad_arguments(kw, match):
    p = np.full((300, 1, 4), 0.25)
    args = dict(predictors=["last"], horizons=(10,))
    args.update(kw)
    with pytest.raises(InputError, match=match):
        evaluation.backtest(p, **args)


def test_bad_array_input():
    with pytest.raises(InputError, match="one layer"):
        evaluation.backtest(np.full((300, 4, 1, 1), 0.25), predictors=["last"], horizons=(10,))
    with pytest.raises(InputError, match="non-negative"):
        evaluation.backtest(-np.ones((300, 1, 4), np.int64), predictors=["last"], horizons=(10,))
