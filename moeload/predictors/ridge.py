"""`ridge`: direct forecast of the horizon-average proportion by ridge regression on window means.

For an origin t (steps seen) and each (layer, expert) series, the features are the means over the
last w steps for w in `windows`, minus the reference mean over the last `windows[ref]` steps; the
target is the mean over the next H steps minus the same reference. A linear combination of window
means is a kernel over the history, so the model can learn both smoothing and drift
extrapolation (e.g. 2 m_200 - m_1000). One model is pooled over all experts and layers and over
origins every `stride` steps of the history (the newest `train_window` steps of origins when set;
and of extra runs passed to `fit([...])`), fitted
with scikit-learn `RidgeCV` (leave-one-out choice of the penalty) when `predict(H)` is first
called for a horizon H. The forecast is that horizon-average, held flat for H steps. Where the
history is too short for targets H steps ahead, the model is trained for the longest horizon the
history allows (half the history; stretching that shift linearly to H was tried and overshoots
decelerating drift). With fewer than `min_origins` origins per series it falls back to the
reference window mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moeload.errors import InputError
from moeload.predictors._util import check_int
from moeload.predictors._windows import cumsum0, window_mean
from moeload.predictors.base import Predictor
from moeload.predictors.registry import register


def window_features(c: np.ndarray, ends: np.ndarray, windows: Sequence[int], ref: int) -> tuple[np.ndarray, np.ndarray]:
    """Features [n_ends, L, E, len(windows) - 1] and reference [n_ends, L, E] from cumsum c."""
    means = np.stack([window_mean(c, ends, w) for w in windows], axis=-1)
    refv = means[..., ref]
    feats = np.delete(means, ref, axis=-1) - refv[..., None]
    return feats, refv


@register("ridge")
class RidgeWindows(Predictor):
    """Ridge regression of the future horizon-average on multi-scale window means, pooled over experts."""

    multi_run = True

    def __init__(
        self,
        *,
        windows: Sequence[int] = (1, 10, 50, 200, 500, 1000, 2000, 4000),
        ref: int = 3,
        stride: int = 25,
        alphas: Sequence[float] = (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0),
        max_samples: int = 200_000,
        min_origins: int = 4,
        train_window: int | None = 2000,
    ) -> None:
        super().__init__()
        self.windows = windows
        self.ref = ref
        self.stride = stride
        self.alphas = alphas
        self.max_samples = max_samples
        self.min_origins = min_origins
        self.train_window = train_window

    def _fit_runs(self, runs: Sequence[np.ndarray]) -> None:
        self.windows_ = [check_int("windows", w) for w in self.windows]
        self.ref_ = check_int("ref", self.ref, 0)
        if self.ref_ >= len(self.windows_):
            raise InputError(f"ref: expected an index into windows (0..{len(self.windows_) - 1}), got {self.ref!r}")
        self.stride_ = check_int("stride", self.stride)
        try:
            self.alphas_ = tuple(float(a) for a in self.alphas)
        except (TypeError, ValueError):
            self.alphas_ = ()
        if not self.alphas_ or not all(0.0 < a < np.inf for a in self.alphas_):
            raise InputError(f"alphas: expected positive numbers, got {self.alphas!r}")
        self.max_samples_ = check_int("max_samples", self.max_samples)
        self.min_origins_ = check_int("min_origins", self.min_origins)
        self.train_window_ = None if self.train_window is None else check_int("train_window", self.train_window)
        self.extra_runs_ = [r for r in runs[:-1]]
        self.models_: dict[int, tuple[Any, np.ndarray] | None] = {}  # horizon -> (RidgeCV, feature scale)

    def _fit(self, p: np.ndarray) -> None:
        self._fit_runs([p])

    def _update(self, new_p: np.ndarray) -> None:
        self.models_ = {}

    def _samples(self, p: np.ndarray, horizon: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
        c = cumsum0(p)
        T = p.shape[0]
        first = max(1, min(self.windows_))
        if self.train_window_ is not None:
            first = max(first, T - horizon - self.train_window_)
        ends = np.arange(T - horizon, first - 1, -stride)[::-1]
        if ends.size == 0:
            return np.zeros((0, len(self.windows_) - 1)), np.zeros(0)
        X, refv = window_features(c, ends, self.windows_, self.ref_)
        y = window_mean(c, ends + horizon, horizon) - refv
        keep = np.broadcast_to(self.mask_[None], y.shape)
        return X[keep], y[keep]

    def _train(self, horizon: int) -> tuple[Any, np.ndarray] | None:
        from sklearn.linear_model import RidgeCV

        T = self.history_.shape[0]
        h_eff = min(horizon, max(1, T // 2))
        n_series = int(self.mask_.sum())
        runs = self.extra_runs_ + [self.history_]
        n_origins = sum(max(0, r.shape[0] - h_eff) for r in runs)
        stride = max(self.stride_, int(np.ceil(n_origins * n_series / self.max_samples_)))
        parts = [
            self._samples(r, min(horizon, r.shape[0] // 2) if r is self.history_ else horizon, stride) for r in runs
        ]
        X = np.concatenate([a for a, _ in parts])
        y = np.concatenate([b for _, b in parts])
        if X.shape[0] < self.min_origins_ * max(n_series, 1):
            return None
        scale = X.std(axis=0) + 1e-12
        model = RidgeCV(alphas=self.alphas_, fit_intercept=True).fit(X / scale, y)
        return model, scale

    def _predict(self, horizon: int) -> np.ndarray:
        if horizon not in self.models_:
            self.models_[horizon] = self._train(horizon)
        c = cumsum0(self.history_[-max(self.windows_) :])
        X, refv = window_features(c, np.array([c.shape[0] - 1]), self.windows_, self.ref_)
        fitted = self.models_[horizon]
        out = refv[0]
        if fitted is not None:
            model, scale = fitted
            L, E, k = X.shape[1:]
            out = out + model.predict(X[0].reshape(-1, k) / scale).reshape(L, E)
        return np.broadcast_to(out, (horizon,) + out.shape).copy()
