"""Predictors on series with known forecasts."""

from __future__ import annotations

import numpy as np
import pytest

from moeload import predictors


def two_expert(x: np.ndarray) -> np.ndarray:
    """x: [T] share of expert 0 -> proportions [T, 1, 2]."""
    return np.stack([x, 1.0 - x], axis=1)[:, None, :]


def test_sw_avg_without_slide_is_the_window_mean(history: np.ndarray) -> None:
    f = predictors.get("sw_avg", window=40, slide=False).fit(history).predict(5)
    np.testing.assert_allclose(f, np.broadcast_to(history[-40:].mean(axis=0), f.shape))


def test_sw_avg_slide_first_step_is_window_mean_and_limit_is_linearly_weighted(history: np.ndarray) -> None:
    w = 30
    f = predictors.get("sw_avg", window=w).fit(history).predict(3000)
    np.testing.assert_allclose(f[0], history[-w:].mean(axis=0))
    # second step: mean of the last w - 1 values and the first prediction
    np.testing.assert_allclose(f[1], (history[-w + 1 :].sum(axis=0) + f[0]) / w)
    k = np.arange(1, w + 1)[:, None, None]
    limit = (k * history[-w:]).sum(axis=0) / (w * (w + 1) / 2)
    np.testing.assert_allclose(f[-1], limit / limit.sum(axis=-1, keepdims=True), atol=1e-9)


def test_sw_avg_short_history_uses_what_exists(history: np.ndarray) -> None:
    f = predictors.get("sw_avg", window=1000, slide=False).fit(history[:7]).predict(2)
    np.testing.assert_allclose(f[0], history[:7].mean(axis=0))


def test_last_repeats_the_last_row(history: np.ndarray) -> None:
    f = predictors.get("last").fit(history).predict(4)
    np.testing.assert_array_equal(f, np.broadcast_to(history[-1], f.shape))


def test_ema_matches_the_recursion(history: np.ndarray) -> None:
    a = 0.1
    level = history[0]
    for row in history[1:]:
        level = a * row + (1 - a) * level
    f = predictors.get("ema", alpha=a).fit(history).predict(2)
    np.testing.assert_allclose(f[0], level, atol=1e-12)
    hl = predictors.get("ema", halflife=10.0, alpha=None).fit(history).predict(1)
    np.testing.assert_allclose(hl, predictors.get("ema", alpha=1 - 0.5 ** 0.1).fit(history).predict(1))


def test_ema_incremental_update_equals_refit(history: np.ndarray) -> None:
    inc = predictors.get("ema").fit(history[:200]).update(history[200:]).predict(3)
    np.testing.assert_allclose(inc, predictors.get("ema").fit(history).predict(3), atol=1e-12)


def test_damped_trend_continues_a_linear_trend() -> None:
    x = 0.2 + 1e-3 * np.arange(300)
    m = predictors.get("damped_trend", alpha=0.5, beta=0.5, phi=1.0).fit(two_expert(x))
    f = m.predict(100)[:, 0, 0]
    np.testing.assert_allclose(f, 0.2 + 1e-3 * np.arange(300, 400), atol=1e-9)


def test_damped_trend_extrapolation_is_bounded_by_phi() -> None:
    x = 0.2 + 1e-3 * np.arange(300)
    m = predictors.get("damped_trend", alpha=0.5, beta=0.5, phi=0.9).fit(two_expert(x))
    f = m.predict(500)[:, 0, 0]
    assert m.trend_[0, 0] == pytest.approx(1e-3, rel=0.2)
    assert f[-1] == pytest.approx(m.level_[0, 0] + m.trend_[0, 0] * 0.9 / 0.1, abs=1e-9)
    assert f[-1] < x[-1] + 0.02


@pytest.mark.parametrize("engine", ["batched", "statsmodels"])
@pytest.mark.parametrize("d", [1, 2])
def test_arima_continues_an_exact_linear_trend(engine: str, d: int) -> None:
    x = 0.2 + 1e-3 * np.arange(100)
    f = predictors.get("arima", order=(1, d, 1), engine=engine).fit(two_expert(x)).predict(50)[:, 0, 0]
    np.testing.assert_allclose(f, 0.2 + 1e-3 * np.arange(100, 150), atol=1e-9)


def test_arima_recovers_an_ar1_on_differences() -> None:
    rng = np.random.default_rng(3)
    T, phi = 3000, 0.6
    w = np.zeros(T)
    e = rng.normal(0, 1e-4, T)
    for t in range(1, T):
        w[t] = phi * w[t - 1] + e[t]
    x = 0.3 + np.cumsum(w)
    m = predictors.get("arima", order=(1, 1, 0)).fit(two_expert(x))
    assert m.params_[0, 0] == pytest.approx(phi, abs=0.05)
    f = m.predict(200)[:, 0, 0]
    expected = x[-1] + w[-1] * np.cumsum(m.params_[0, 0] ** np.arange(1, 201))
    np.testing.assert_allclose(f, expected, atol=1e-12)


def test_kalman_gain_grows_with_level_noise() -> None:
    rng = np.random.default_rng(0)
    T = 4000
    walk = 0.5 + np.cumsum(rng.normal(0, 2e-3, T))
    noisy_flat = 0.5 + rng.normal(0, 2e-2, T)
    p = np.concatenate([two_expert(np.clip(walk, 0.05, 0.95)), two_expert(noisy_flat)], axis=1)
    m = predictors.get("kalman", pool="series").fit(p)
    assert m.gain_[0, 0] > 10 * m.gain_[1, 0]


def test_kalman_block_estimate_sees_level_noise_under_correlated_noise() -> None:
    # random-walk level + AR(1) noise (rho 0.8): the lag-1 moment estimator takes the noise's slow
    # wander for level noise (q far too high); on 50-step means the noise is nearly white again
    rng = np.random.default_rng(3)
    T, sd_eta = 6000, 5e-4
    level = 0.5 + np.cumsum(rng.normal(0, sd_eta, T))
    ar = np.zeros(T)
    e = rng.normal(0, 1e-2, T)
    for t in range(1, T):
        ar[t] = 0.8 * ar[t - 1] + e[t]
    p = two_expert(np.clip(level + ar, 0.01, 0.99))
    white = predictors.get("kalman", pool="series").fit(p)
    blocked = predictors.get("kalman", pool="series", block=50).fit(p)
    q_true = sd_eta**2 / (1e-2**2 / (1 - 0.8) ** 2)  # level noise / long-run noise variance per step
    assert white.q_[0, 0] > 100 * q_true
    assert 0.2 * q_true < blocked.q_[0, 0] < 5 * q_true


def test_state_aware_window_starts_at_a_level_shift() -> None:
    rng = np.random.default_rng(1)
    x = np.r_[np.full(3000, 0.3), np.full(1000, 0.5)] + rng.normal(0, 0.01, 4000)
    m = predictors.get("state_aware", block=50, min_blocks=2).fit(two_expert(x))
    assert 950 <= m.window_[0, 0] <= 1050
    assert m.predict(10)[0, 0, 0] == pytest.approx(0.5, abs=0.003)
    stable = predictors.get("state_aware", block=50).fit(two_expert(0.3 + rng.normal(0, 0.01, 4000)))
    assert stable.window_[0, 0] >= 3000


def test_ridge_learns_to_extrapolate_a_steady_drift() -> None:
    rng = np.random.default_rng(2)
    T = 3000
    x = 0.2 + 1e-4 * np.arange(T) + rng.normal(0, 0.005, T)
    H = 500
    f = predictors.get("ridge").fit(two_expert(x)).predict(H)[:, 0, 0]
    truth = 0.2 + 1e-4 * np.arange(T, T + H).mean()
    sw = predictors.get("sw_avg", window=200, slide=False).fit(two_expert(x)).predict(H)[:, 0, 0]
    assert abs(f.mean() - truth) < 0.3 * abs(sw.mean() - truth)
