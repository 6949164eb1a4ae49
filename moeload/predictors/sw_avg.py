"""`sw_avg`: sliding-window average (the paper's SW_Avg).

With `slide=True` (the paper's semantics) step t+1 is predicted as the mean of the last `window`
values, the prediction is appended and the window slides forward, `horizon` times. The slid
forecast converges geometrically to a linearly weighted mean of the last window,
sum_k k x_k / (w (w + 1) / 2) with k = 1 (oldest) .. w (newest): sliding forward reweights the
window towards its recent end; it never extrapolates beyond the range of the window.
`slide=False` repeats the plain window mean. Histories shorter than `window` use what exists.
"""

from __future__ import annotations

import numpy as np

from moeload.predictors._util import check_int
from moeload.predictors.base import Predictor
from moeload.predictors.registry import register


@register("sw_avg")
class SlidingWindowAverage(Predictor):
    """Mean of the last `window` steps, slid forward step by step (paper) or held flat."""

    def __init__(self, *, window: int = 100, slide: bool = True) -> None:
        super().__init__()
        self.window = window
        self.slide = slide

    def _fit(self, p: np.ndarray) -> None:
        self.width_ = check_int("window", self.window)
        self.slide_ = bool(self.slide)
        self.window_ = p[-self.width_ :].copy()  # [w', L, E], w' = min(window, T)

    def _update(self, new_p: np.ndarray) -> None:
        self.window_ = self.history_[-self.width_ :].copy()

    def _predict(self, horizon: int) -> np.ndarray:
        buf = self.window_.copy()
        w = buf.shape[0]
        total = buf.sum(axis=0)
        if not self.slide_:
            return np.broadcast_to(total / w, (horizon,) + total.shape).copy()
        out = np.empty((horizon,) + total.shape)
        for h in range(horizon):
            y = total / w
            out[h] = y
            i = h % w
            total += y - buf[i]
            buf[i] = y
        return out
