"""Forecasts of expert load proportions: `get(name, **hyper).fit(p).predict(horizon)`.

Every predictor takes p: [T, L, E] proportions and returns [horizon, L, E] rows on the simplex.
Families (one module each): last, sw_avg, ema, kalman, damped_trend, arima, ridge, state_aware, combo,
blend (weights learned on other runs with `blend.learn_blend`), online_blend (weights learned on
the run's own past at each forecast), lstm (torch, imported only when fitted).
"""

from __future__ import annotations

from moeload.predictors import (  # noqa: F401
    arima,
    blend,
    combo,
    damped_trend,
    ema,
    kalman,
    last,
    lstm,
    mean_revert,
    online_blend,
    ridge,
    state_aware,
    sw_avg,
)
from moeload.predictors.base import Predictor
from moeload.predictors.registry import available, from_spec, get, register, spec_label

__all__ = ["Predictor", "available", "from_spec", "get", "register", "spec_label"]
