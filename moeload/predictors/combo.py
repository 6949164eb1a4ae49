"""`combo`: the average of several predictors' forecasts (forecast combination).

Averaging forecasts whose errors are not perfectly correlated lowers the error of the mean share;
members are predictor specs (`registry.from_spec`: names, (name, hyper) pairs or Predictors), and `weights`
(None = equal) must be non-negative.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moeload.errors import InputError
from moeload.predictors.base import Predictor
from moeload.predictors.registry import from_spec, register

# tuned on synthetic seed 0 (benchmarks/predictor_accuracy.py): ridge for the stable phase, the
# trend-extrapolating adaptive window for transients
DEFAULT = (("ridge", {"train_window": 2000}), ("state_aware", {"trend": True, "threshold": 6.0, "trend_reach": 2000}))
DEFAULT_WEIGHTS = (0.75, 0.25)


@register("combo")
class Combination(Predictor):
    """Weighted mean of member forecasts; members fitted and updated alongside."""

    multi_run = True

    def __init__(self, *, members: Sequence[Any] = DEFAULT, weights: Sequence[float] | None = DEFAULT_WEIGHTS) -> None:
        super().__init__()
        self.members = members
        self.weights = weights

    def _make(self) -> list[Predictor]:
        out = [from_spec(m, "members") for m in self.members]
        if any(isinstance(m, Combination) for m in out):
            raise InputError("members: a combo cannot contain a combo")
        if not out:
            raise InputError("members: give at least one predictor")
        w = np.ones(len(out)) if self.weights is None else np.asarray(self.weights, dtype=np.float64)
        if w.shape != (len(out),) or (w < 0).any() or w.sum() <= 0:
            raise InputError(f"weights: need {len(out)} non-negative numbers, got {self.weights!r}")
        self.weights_ = w / w.sum()
        return out

    def _fit_runs(self, runs: Sequence[np.ndarray]) -> None:
        self.members_ = self._make()
        for m in self.members_:
            m.fit(list(runs) if m.multi_run and len(runs) > 1 else runs[-1])

    def _fit(self, p: np.ndarray) -> None:
        self._fit_runs([p])

    def _update(self, new_p: np.ndarray) -> None:
        for m in self.members_:
            m.update(new_p)

    def _predict(self, horizon: int) -> np.ndarray:
        return sum(w * m.predict(horizon) for w, m in zip(self.weights_, self.members_))
