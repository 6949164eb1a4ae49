"""mean_revert: the closed form, shipped defaults, and known answers against SW_Avg."""

from __future__ import annotations

import numpy as np
import pytest

from moeload import predictors
from moeload.errors import InputError
from moeload.evaluation import backtest
from moeload.predictors._defaults import MEAN_REVERT


def reverting(T: int = 1500, E: int = 8, phi: float = 0.98, n: int = 4000, seed: int = 0) -> np.ndarray:
    """Proportions [T, 1, E]: multinomial noise around 1/E + an AR(1) deviation that decays by phi per step."""
    rng = np.random.default_rng(seed)
    x = np.zeros(E)
    out = np.empty((T, 1, E))
    for t in range(T):
        x = phi * x + rng.normal(0, 0.004, E)
        x -= x.mean()
        mean = np.clip(1 / E + x, 1e-4, None)
        out[t, 0] = rng.multinomial(n, mean / mean.sum()) / n
    return out


def test_forecast_is_the_closed_form() -> None:
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(4) * 20, size=(50, 2))  # [50, 2, 4]
    f = predictors.get("mean_revert", window=20, rho=0.9, shrink=0.0, target="uniform").fit(p).predict(5)
    m = p[-20:].mean(axis=0)
    want = 0.25 + (m - 0.25)[None] * 0.9 ** np.arange(1, 6)[:, None, None]
    np.testing.assert_allclose(f, want, atol=1e-12)


def test_long_target_and_shrink() -> None:
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(5) * 50, size=(300, 1))
    f = predictors.get("mean_revert", window=30, rho=0.5, shrink=0.0, target="long", long_window=200).fit(p).predict(40)
    np.testing.assert_allclose(f[-1], p[-200:].mean(axis=0), atol=1e-9)  # rho^40 ~ 1e-12: at the target
    # deviations that are pure window noise (iid Dirichlet) are shrunk to the target by a large `shrink`
    g = predictors.get("mean_revert", window=30, rho=1.0, shrink=1e6, target="uniform").fit(p).predict(3)
    np.testing.assert_allclose(g, 0.2, atol=1e-12)


def test_noise_of_the_window_mean_is_estimated_from_block_means() -> None:
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(4) * 30, size=(100, 1))
    m = predictors.get("mean_revert", window=60, rho=1.0, shrink=1.0, block=10, target="uniform").fit(p)
    blocks = p[-60:].reshape(6, 10, 1, 4).mean(axis=1)  # [6 blocks, 1, 4]
    noise = blocks.var(axis=0, ddof=1).mean() / 6
    disp = ((p[-60:].mean(axis=0) - 0.25) ** 2).mean()
    np.testing.assert_allclose(m.scale_, [max(0.0, 1 - noise / disp)], rtol=1e-12)
    # a window too short for two blocks falls back to per-step noise
    short = predictors.get("mean_revert", window=15, rho=1.0, shrink=1.0, block=10).fit(p)
    one = predictors.get("mean_revert", window=15, rho=1.0, shrink=1.0, block=1).fit(p)
    np.testing.assert_array_equal(short.scale_, one.scale_)


def test_defaults_come_from_the_shipped_table() -> None:
    p = reverting(T=300)
    for regime, d in MEAN_REVERT.items():
        got = predictors.get("mean_revert", regime=regime).fit(p)
        assert {k: got.params_[k] for k in d} == d
        explicit = predictors.get("mean_revert", **d).fit(p)
        np.testing.assert_array_equal(got.predict(10), explicit.predict(10))
    with pytest.raises(InputError, match="regime"):
        predictors.get("mean_revert", regime="nope").fit(p)
    with pytest.raises(InputError, match="target"):
        predictors.get("mean_revert", target="median").fit(p)
    with pytest.raises(InputError, match="rho"):
        predictors.get("mean_revert", rho=1.5).fit(p)


def test_constant_series_equals_sw_avg() -> None:
    row = np.array([[0.4, 0.3, 0.2, 0.1]])
    p = np.repeat(row[None], 200, axis=0)
    for regime in MEAN_REVERT:
        f = predictors.get("mean_revert", regime=regime, target="long").fit(p).predict(100)
        np.testing.assert_allclose(f, predictors.get("sw_avg").fit(p).predict(100), atol=1e-12)
    f = predictors.get("mean_revert").fit(p).predict(100)  # shipped aux defaults
    np.testing.assert_allclose(f, predictors.get("sw_avg").fit(p).predict(100), atol=1e-12)


def test_beats_sw_avg_at_its_best_window_on_a_mean_reverting_series() -> None:
    p = reverting()
    H = 200
    sw = [("sw_avg", {"window": w, "slide": s}) for w in (25, 50, 100, 200, 400) for s in (True, False)]
    mr = ("mean_revert", {"window": 25, "rho": 0.98, "shrink": 0.0})  # the true rate
    df = backtest(p, [mr, *sw], horizons=[H], every=50, min_history=200, phases=False)
    err = df.groupby("predictor")["havg_mae_pp"].mean()
    best_sw = err.drop(err.index[err.index.str.startswith("mean_revert")]).min()
    assert err[err.index.str.startswith("mean_revert")].iloc[0] < 0.85 * best_sw  # measured 0.79


def test_shipped_bias_defaults_are_the_fit_on_both_bias_runs() -> None:
    """The "bias" row of _defaults.py is what benchmarks/forecast_defaults.py fits on every expert-bias trace
    (both seeds), and its provenance names them: a stale table (a trace added, --write not run) fails here."""
    import importlib.util
    from pathlib import Path

    from moeload.predictors._defaults import PROVENANCE

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "forecast_defaults.py"
    spec = importlib.util.spec_from_file_location("forecast_defaults", path)
    fd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fd)
    names = [n for n, (_, regime) in fd.RUNS.items() if regime == "bias"]
    assert names == ["gpt3-small-moe-bias-s0", "gpt3-small-moe-bias-s1"]
    runs = [fd.Run(n, *fd.RUNS[n]) for n in names]
    s = fd.fit([r.grid() for r in runs], [r.sw_best() for r in runs])
    assert fd.params(s) == MEAN_REVERT["bias"]
    assert all(n in PROVENANCE["bias"] for n in names)


def _forecast_defaults():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "forecast_defaults.py"
    spec = importlib.util.spec_from_file_location("forecast_defaults", path)
    fd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fd)
    return fd


def test_linear_bound_is_below_every_flat_window_and_uniform() -> None:
    """The hindsight bound of the --test table (best linear blend of window means, weights chosen on the
    test cell by least absolute deviation) is at most the error of each member it blends: SW_Avg with a
    flat window of LIN_WINDOWS, and the constant 1/E."""
    fd = _forecast_defaults()
    run = fd.Run("demo", "notebooks/data/demo.moeload", "aux")
    bound = fd.linear_bound(run)
    uni = run.uniform()
    assert set(bound) == set(uni) and bound
    for H in run.horizons:
        specs = [("sw_avg", {"window": w, "slide": False}) for w in fd.LIN_WINDOWS]
        df = backtest(run.p, specs, horizons=[H], origins=run.org[H], phases=run.labels)
        for ph, g in df.groupby("phase"):
            worst_ok = g.groupby("predictor")["havg_mae_pp"].mean().min()
            assert bound[(H, ph)] <= worst_ok + 1e-6
            assert bound[(H, ph)] <= uni[(H, ph)] + 1e-6
            assert bound[(H, ph)] > 0
