"""`ema`: exponential moving average level, held flat over the horizon."""

from __future__ import annotations

import numpy as np

from moeload.errors import InputError
from moeload.predictors._util import check_float, ema_last
from moeload.predictors.base import Predictor
from moeload.predictors.registry import register


@register("ema")
class ExponentialMovingAverage(Predictor):
    """level_t = alpha * p_t + (1 - alpha) * level_{t-1}; give `alpha` or `halflife` (steps)."""

    def __init__(self, *, alpha: float | None = None, halflife: float | None = 200.0) -> None:
        super().__init__()
        self.alpha = alpha
        self.halflife = halflife

    def _alpha(self) -> float:
        if self.alpha is not None:
            return check_float("alpha", self.alpha, 1e-12, 1.0)
        if self.halflife is None:
            raise InputError("ema: give alpha or halflife")
        hl = check_float("halflife", self.halflife, 1e-12, np.inf)
        return 1.0 - 0.5 ** (1.0 / hl)

    def _fit(self, p: np.ndarray) -> None:
        self.alpha_ = self._alpha()
        self.level_ = ema_last(p, self.alpha_)  # [L, E]

    def _update(self, new_p: np.ndarray) -> None:
        self.level_ = ema_last(new_p, self.alpha_, self.level_)

    def _predict(self, horizon: int) -> np.ndarray:
        return np.broadcast_to(self.level_, (horizon,) + self.level_.shape).copy()
