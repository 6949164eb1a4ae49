"""`state_aware`: average since the last detected shift (an adaptive window per series).

The history is cut into blocks of `block` steps (aligned to the end). For k = 1, 2, ... blocks
back, the mean of the last k blocks is compared with the mean of the k blocks before them; the
noise of a block mean is estimated robustly per series from differences of consecutive block
means. The smallest k whose two-sample z statistic exceeds `threshold` says a shift lies within
the newest 2k blocks; it is placed at the best single split of those blocks (CUSUM statistic). The
forecast is the mean of the last max(k, `min_blocks`) blocks (all of the history, up to
`max_window` steps, when no shift is found: a stable phase gets a long average, a transient or
drifting phase a short one). With `trend=True` a least-squares slope over that window,
shrunk towards 0 by its t statistic (factor max(0, 1 - 4 / t^2)) and damped to at most `trend_reach`
steps, is extrapolated to each future step (defaults tuned on synthetic seed 0 with
benchmarks/predictor_accuracy.py). Self-contained: does not need `moeload.states`.
"""

from __future__ import annotations

import numpy as np

from moeload.predictors._util import check_float, check_int
from moeload.predictors._windows import cumsum0
from moeload.predictors.base import Predictor
from moeload.predictors.registry import register


def last_shift_window(p: np.ndarray, block: int, threshold: float, min_blocks: int, max_window: int) -> np.ndarray:
    """Steps since the last detected shift per series. p: [T, L, E] -> int [L, E]."""
    T = p.shape[0]
    n = T // block
    if n < 2 * max(min_blocks, 1):
        return np.full(p.shape[1:], min(T, max_window), dtype=np.int64)
    z = p[T - n * block :].reshape(n, block, *p.shape[1:]).mean(axis=1)  # [n, L, E] block means
    dz = np.diff(z, axis=0)
    sd = 1.4826 * np.median(np.abs(dz - np.median(dz, axis=0)), axis=0) / np.sqrt(2.0) + 1e-12  # [L, E]
    c = cumsum0(z[::-1])  # c[k] = sum of the newest k blocks
    k = np.arange(1, n // 2 + 1)
    recent = c[k] / k[:, None, None]
    before = (c[2 * k] - c[k]) / k[:, None, None]
    stat = np.abs(recent - before) / (sd[None] * np.sqrt(2.0 / k)[:, None, None])
    hit = stat > threshold  # [K, L, E]
    found = hit.any(axis=0)
    first = np.where(found, hit.argmax(axis=0) + 1, n)  # blocks back of the first significant test
    # locate the change inside the newest m = 2 * first blocks: best single split (CUSUM statistic)
    m = np.minimum(2 * first, n)
    j = np.arange(1, n)[:, None, None]  # candidate split: newest j blocks vs the rest of the m
    cm = np.take_along_axis(c, m[None], axis=0)[0]
    cj = c[1:n]
    rest = np.maximum(m[None] - j, 1)
    split = np.abs(cj / j - (cm[None] - cj) / rest) * np.sqrt(j * rest / m[None])
    split = np.where(j < m[None], split, -np.inf)
    last = np.where(found, split.argmax(axis=0) + 1, n)
    blocks = np.maximum(last, min_blocks)
    return np.minimum(blocks * block + (T - n * block) * (last == n), max_window).astype(np.int64)


@register("state_aware")
class StateAwareWindow(Predictor):
    """Mean since the last detected shift per (layer, expert), optionally with a shrunk trend."""

    def __init__(
        self,
        *,
        block: int = 50,
        threshold: float = 6.0,
        min_blocks: int = 4,
        max_window: int = 8000,
        trend: bool = True,
        trend_reach: int = 2000,
    ) -> None:
        super().__init__()
        self.block = block
        self.threshold = threshold
        self.min_blocks = min_blocks
        self.max_window = max_window
        self.trend = trend
        self.trend_reach = trend_reach

    def _fit(self, p: np.ndarray) -> None:
        block = check_int("block", self.block)
        thr = check_float("threshold", self.threshold, 0.0, np.inf)
        max_w = check_int("max_window", self.max_window)
        self.reach_ = check_int("trend_reach", self.trend_reach, 0)
        self.window_ = last_shift_window(p[-max_w:], block, thr, check_int("min_blocks", self.min_blocks), max_w)
        T = p.shape[0]
        c = cumsum0(p)
        w = np.minimum(self.window_, T)
        L, E = p.shape[1:]
        li, ei = np.meshgrid(np.arange(L), np.arange(E), indexing="ij")
        self.level_ = (c[T][li, ei] - c[T - w, li, ei]) / w  # [L, E] window mean
        self.slope_ = np.zeros((L, E))
        if self.trend:
            self.slope_ = self._shrunk_slope(p, w)

    def _shrunk_slope(self, p: np.ndarray, w: np.ndarray) -> np.ndarray:
        """OLS slope over each series' window, shrunk by its t statistic. -> [L, E]."""
        p = p[-int(w.max()) :]
        T = p.shape[0]
        t = np.arange(T, dtype=np.float64)[:, None, None]
        inside = t >= (T - w)[None]
        n = np.maximum(w, 1).astype(np.float64)
        tm = (np.where(inside, t, 0.0).sum(0)) / n
        ym = np.where(inside, p, 0.0).sum(0) / n
        dt = np.where(inside, t - tm, 0.0)
        sxx = (dt * dt).sum(0) + 1e-12
        slope = (dt * np.where(inside, p - ym, 0.0)).sum(0) / sxx
        resid = np.where(inside, p - ym - slope * dt, 0.0)
        s2 = (resid * resid).sum(0) / np.maximum(n - 2, 1)
        tstat2 = slope * slope * sxx / (s2 + 1e-300)
        return slope * np.clip(1.0 - 4.0 / np.maximum(tstat2, 1e-12), 0.0, 1.0)

    def _predict(self, horizon: int) -> np.ndarray:
        w = np.minimum(self.window_, self.cutoff_)
        h = np.arange(1, horizon + 1, dtype=np.float64)[:, None, None]
        steps = np.minimum((w - 1)[None] / 2.0 + h, (w - 1)[None] / 2.0 + self.reach_)
        return self.level_[None] + self.slope_[None] * steps
