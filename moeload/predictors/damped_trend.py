"""`damped_trend`: Holt's linear method with a damped trend, on proportions, all series at once.

level_t = a p_t + (1 - a)(level + phi b);  b_t = beta (level_t - level_{t-1}) + (1 - beta) phi b.
Forecast h steps ahead: level + (phi + ... + phi^h) b; the trend's total contribution is bounded
by b phi / (1 - phi), so slow drift is extrapolated a finite way, then held. Started at
level = p_0, b = 0. `update` continues the recursion.
"""

from __future__ import annotations

import numpy as np

from moeload.predictors._util import check_float
from moeload.predictors.base import Predictor
from moeload.predictors.registry import register


def holt_damped(
    p: np.ndarray, alpha: float, beta: float, phi: float, state: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Run the recursion over p: [T, ...]. Returns (level [...], trend [...])."""
    if state is None:
        level, trend = p[0].astype(np.float64).copy(), np.zeros(p.shape[1:])
        p = p[1:]
    else:
        level, trend = state[0].copy(), state[1].copy()
    for y in p:
        prev = level
        level = alpha * y + (1.0 - alpha) * (level + phi * trend)
        trend = beta * (level - prev) + (1.0 - beta) * phi * trend
    return level, trend


@register("damped_trend")
class DampedTrend(Predictor):
    """Holt damped-trend exponential smoothing, vectorised over layers and experts."""

    def __init__(self, *, alpha: float = 0.01, beta: float = 0.002, phi: float = 0.998) -> None:
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.phi = phi

    def _params(self) -> tuple[float, float, float]:
        return (
            check_float("alpha", self.alpha, 0.0, 1.0),
            check_float("beta", self.beta, 0.0, 1.0),
            check_float("phi", self.phi, 0.0, 1.0),
        )

    def _fit(self, p: np.ndarray) -> None:
        self.params_ = self._params()  # (alpha, beta, phi) validated
        self.level_, self.trend_ = holt_damped(p, *self.params_)

    def _update(self, new_p: np.ndarray) -> None:
        self.level_, self.trend_ = holt_damped(new_p, *self.params_, state=(self.level_, self.trend_))

    def _predict(self, horizon: int) -> np.ndarray:
        phi = self.params_[2]
        steps = np.cumsum(phi ** np.arange(1, horizon + 1))  # [H]
        return self.level_[None] + steps[:, None, None] * self.trend_[None]
