"""online_blend: weights learned on the run's own past (real traces), the solver, update, fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moeload import open_trace, predictors
from moeload.errors import InputError
from moeload.evaluation import backtest
from moeload.predictors.online_blend import solve_weights

TRACES = Path(__file__).resolve().parents[2] / "experiments" / "traces"


@pytest.fixture(scope="module")
def aux10k() -> np.ndarray:
    """gpt3-small-moe-aux-s0 (experiments/train_long.py, 10,000 steps, 6 x 16): [S, L, E]."""
    return open_trace(TRACES / "gpt3-small-moe-aux-s0.moeload").proportions()


@pytest.fixture(scope="module")
def bias_s1() -> np.ndarray:
    """gpt3-small-moe-bias-s1 (1,500 steps, expert-bias balancing, 6 x 16): [S, L, E]."""
    return open_trace(TRACES / "gpt3-small-moe-bias-s1.moeload").proportions()


def test_forecast_is_the_learned_blend_of_the_window_means(bias_s1: np.ndarray) -> None:
    p = bias_s1[:1000]
    m = predictors.get("online_blend").fit(p)
    f = m.predict(300)
    # the weights were fit for the requested horizon: 900 steps after min_origin leave room for 300
    assert m.horizon_fit_ == 300
    a = m.weights_  # [L, K] (pool="layer")
    assert a.shape == (6, len(m.windows_) + 1)
    assert (a >= -1e-12).all() and np.allclose(a.sum(axis=1), 1.0)
    means = np.stack([p[-w:].mean(axis=0) for w in m.windows_] + [np.full((6, 16), 1 / 16)], axis=-1)  # [L, E, K]
    want = np.einsum("lek,lk->le", means, a)
    np.testing.assert_allclose(f, np.broadcast_to(want, f.shape), atol=1e-12)
    # a longer horizon than the history can hold is fit for the longest one it does (half the usable history)
    g = predictors.get("online_blend").fit(p)
    g.predict(2000)
    assert g.horizon_fit_ == (1000 - 100) // 2


def test_learns_what_the_run_rewards(aux10k: np.ndarray, bias_s1: np.ndarray) -> None:
    # late in the 10k aux run (stable phase) the blend beats SW_Avg at the windows that are best there
    late = list(range(7500, 9001, 250))
    df = backtest(
        aux10k,
        ["online_blend", ("sw_avg", {"window": 800, "slide": False}), ("sw_avg", {"window": 1600})],
        horizons=[1000],
        origins=late,
        phases=False,
    )
    err = df.groupby("predictor")["havg_mae_pp"].mean()
    assert err["online_blend"] < 0.9 * min(err["sw_avg(slide=False, window=800)"], err["sw_avg(window=1600)"])
    # early in an expert-bias run the shares are pulled back to 1/E and the weights learn the pull
    m = predictors.get("online_blend").fit(bias_s1[:500])
    m.predict(1000)
    assert m.weights_[:, -1].mean() > 0.3  # weight of 1/E (0.41 measured; 0 for SW_Avg)
    df = backtest(bias_s1, ["online_blend", "sw_avg"], horizons=[1000], origins=[250, 375, 500], phases=False)
    err = df.groupby("predictor")["havg_mae_pp"].mean()
    assert err["online_blend"] < 0.9 * err["sw_avg"]


def test_update_equals_refit(aux10k: np.ndarray) -> None:
    p = aux10k[:3000]
    inc = predictors.get("online_blend").fit(p[:2000]).update(p[2000:2600]).update(p[2600:])
    full = predictors.get("online_blend").fit(p)
    np.testing.assert_allclose(inc.predict(1000), full.predict(1000), atol=1e-12)
    np.testing.assert_allclose(inc.weights_, full.weights_, atol=1e-12)


def test_short_history_falls_back_to_the_window_mean(bias_s1: np.ndarray) -> None:
    p = bias_s1[:150]  # fewer than min_pairs training origins after min_origin
    m = predictors.get("online_blend").fit(p)
    f = m.predict(1000)
    assert m.horizon_fit_ == 0
    np.testing.assert_allclose(f[0], p[-50:].mean(axis=0), atol=1e-12)


def test_solver_recovers_a_convex_blend_and_respects_the_constraints() -> None:
    rng = np.random.default_rng(0)
    X = rng.dirichlet(np.ones(4), size=500)  # [n, K] features
    w = np.array([0.0, 0.3, 0.0, 0.7])
    y = X @ w
    Q, q, yy = X.T @ X / 500, X.T @ y / 500, float(y @ y / 500)
    np.testing.assert_allclose(solve_weights(Q, q, yy, 0.0, True), w, atol=1e-6)
    np.testing.assert_allclose(solve_weights(Q, q, yy, 0.0, False), w, atol=1e-6)
    # a target outside the hull: non-negative weights stay on the simplex, free ones only sum to 1
    y2 = 1.5 * X[:, 0] - 0.5 * X[:, 1]
    q2, yy2 = X.T @ y2 / 500, float(y2 @ y2 / 500)
    a = solve_weights(Q, q2, yy2, 0.0, True)
    assert (a >= 0).all() and np.isclose(a.sum(), 1.0)
    b = solve_weights(Q, q2, yy2, 0.0, False)
    np.testing.assert_allclose(b, [1.5, -0.5, 0.0, 0.0], atol=1e-6)
    # a huge ridge returns the best single feature
    np.testing.assert_allclose(solve_weights(Q, q, yy, 1e9, True), np.eye(4)[3], atol=1e-6)


@pytest.mark.parametrize(
    "hyper, match",
    [
        ({"pool": "expert"}, "pool"),
        ({"windows": []}, "windows"),
        ({"windows": (25, 0)}, "windows"),
        ({"ridge": -1.0}, "ridge"),
        ({"stride": 0}, "stride"),
        ({"halflife": 0.0}, "halflife"),
    ],
)
def test_bad_hyperparameters_are_input_errors(hyper: dict, match: str, bias_s1: np.ndarray) -> None:
    with pytest.raises(InputError, match=match):
        predictors.get("online_blend", **hyper).fit(bias_s1[:100])
