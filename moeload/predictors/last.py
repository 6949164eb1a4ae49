"""`last`: the last observed proportions, repeated."""

from __future__ import annotations

import numpy as np

from moeload.predictors.base import Predictor
from moeload.predictors.registry import register


@register("last")
class LastValue(Predictor):
    """Persistence forecast: every future step equals the last observed step."""

    def __init__(self) -> None:
        super().__init__()

    def _fit(self, p: np.ndarray) -> None:
        self.last_ = p[-1].copy()  # [L, E]

    def _update(self, new_p: np.ndarray) -> None:
        self.last_ = new_p[-1].copy()

    def _predict(self, horizon: int) -> np.ndarray:
        return np.broadcast_to(self.last_, (horizon,) + self.last_.shape).copy()
