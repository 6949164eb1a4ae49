"""Property tests: shapes, simplex, zero-count experts, constant series, short histories."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeload import predictors

# lstm is covered by the contract test and its own tests (torch training per example is slow)
NAMES = [n for n in predictors.available() if n != "lstm"]


@st.composite
def histories(draw):
    T = draw(st.integers(1, 60))
    L = draw(st.integers(1, 3))
    E = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    zero = rng.random((L, E)) < draw(st.floats(0.0, 0.6))
    zero[:, 0] = False  # every layer keeps at least one expert with tokens
    raw = rng.gamma(0.5, size=(T, L, E)) * ~zero[None]
    raw[..., 0] += 1e-3
    return raw / raw.sum(axis=2, keepdims=True), zero


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=histories(), name=st.sampled_from(NAMES), horizon=st.integers(1, 40), window=st.integers(1, 100))
def test_forecasts_are_on_the_simplex_and_zero_experts_stay_zero(data, name, horizon, window) -> None:
    p, zero = data
    hyper = {"window": window} if name == "sw_avg" else {}
    f = predictors.get(name, **hyper).fit(p).predict(horizon)
    assert f.shape == (horizon,) + p.shape[1:]
    assert np.isfinite(f).all() and (f >= 0).all()
    np.testing.assert_allclose(f.sum(axis=2), 1.0, atol=1e-9)
    assert np.all(f[:, zero] <= 1e-12)


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 80), E=st.integers(1, 6), name=st.sampled_from(NAMES), seed=st.integers(0, 1000))
def test_constant_series_forecast_is_that_constant(T, E, name, seed) -> None:
    row = np.random.default_rng(seed).dirichlet(np.ones(E))
    p = np.broadcast_to(row, (T, 1, E))
    f = predictors.get(name).fit(p).predict(5)
    np.testing.assert_allclose(f, np.broadcast_to(row, f.shape), atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 30), window=st.integers(31, 500), seed=st.integers(0, 1000))
def test_history_shorter_than_window(T, window, seed) -> None:
    p = np.random.default_rng(seed).dirichlet(np.ones(4), size=(T, 2))
    f = predictors.get("sw_avg", window=window, slide=False).fit(p).predict(3)
    np.testing.assert_allclose(f[0], p.mean(axis=0), atol=1e-12)
    for name in ("state_aware", "ridge", "damped_trend", "kalman", "arima"):
        g = predictors.get(name).fit(p).predict(3)
        assert g.shape == (3, 2, 4) and np.allclose(g.sum(axis=2), 1.0)
