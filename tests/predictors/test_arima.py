"""Batched ARIMA (CSS) against the statsmodels reference (exact likelihood).

Documented tolerance (see moeload/predictors/arima.py and benchmarks/predictor_speed.py): on most
series the two engines' forecasts of the horizon-average differ by less than 0.25 of the series'
step-to-step noise sd(p_t - p_{t-1}), and single steps by less than 1.0 of it. CSS and the exact
likelihood of an over-parameterised ARMA can settle in different optima (e.g. a near-unit AR root
with a near-cancelling MA root, which forecasts a drift), so a minority of series differ more: the
test asks the tolerance of at least two thirds of the series.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from moeload import predictors

HAVG_TOL, STEP_TOL = 0.25, 1.0


@pytest.mark.parametrize("order", [(1, 1, 1), (2, 1, 2)])
def test_batched_agrees_with_statsmodels(order, make_drifting) -> None:
    p = make_drifting(T=400, L=2, E=3, seed=5)
    H = 200
    b = predictors.get("arima", order=order).fit(p)
    s = predictors.get("arima", order=order, engine="statsmodels").fit(p)
    fb, fs = b._predict(H), s._predict(H)  # raw forecasts, before the simplex projection
    sd = np.diff(p, axis=0).std(axis=0)
    within = (np.abs(fb.mean(0) - fs.mean(0)) / sd < HAVG_TOL) & (np.abs(fb - fs).max(0) / sd < STEP_TOL)
    assert within.mean() >= 2 / 3, within


def test_batched_is_faster_than_statsmodels(make_drifting) -> None:
    p = make_drifting(T=300, L=1, E=4, seed=6)
    predictors.get("arima", order=(2, 1, 2)).fit(p[:60])  # warm imports
    predictors.get("arima", order=(2, 1, 2), engine="statsmodels").fit(p[:60])
    t0 = time.process_time()
    predictors.get("arima", order=(2, 1, 2)).fit(p).predict(10)
    tb = time.process_time() - t0
    t0 = time.process_time()
    predictors.get("arima", order=(2, 1, 2), engine="statsmodels").fit(p).predict(10)
    ts = time.process_time() - t0
    assert ts > 3 * tb


def test_bad_order_and_engine_are_input_errors(make_drifting) -> None:
    from moeload.errors import InputError

    p = make_drifting(T=50, L=1, E=2)
    with pytest.raises(InputError, match="order"):
        predictors.get("arima", order=(1, 3, 1)).fit(p)
    with pytest.raises(InputError, match="engine"):
        predictors.get("arima", engine="R").fit(p)
