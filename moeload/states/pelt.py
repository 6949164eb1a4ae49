"""Change points (ruptures PELT) in the log fluctuation level of each layer.

Signal: the run is cut into non-overlapping blocks of b steps (b = max(block, ceil(S / max_points))
so PELT sees at most `max_points` points); per block and expert, the range (or variance) of the
expert's proportion within the block; mean over experts; natural log. PELT with an l2 cost finds
changes of the mean log level (cost from cumulative sums), penalty = pen * sigma^2 * log(n),
sigma the noise of the signal estimated from its first differences (MAD / 0.6745 / sqrt 2), so the rule is scale-free.
A segment is stable when its mean log level is within log(factor) of the lowest segment level
(segments shorter than min_size blocks cannot occur). Offline only: it sees the whole run.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import numpy as np

from moeload.errors import InputError
from moeload.states._input import LoadInput, int_param, pos_param
from moeload.states.base import Detector, StateResult, finish


@functools.cache
def _cost_class() -> type:
    """The cost class, built on first use so that importing moeload.states skips ruptures."""
    from ruptures.base import BaseCost

    class _CumsumL2(BaseCost):
        """ruptures cost: squared deviations from the segment mean in O(1) by cumulative sums (the
        built-in "l2" cost recomputes each slice, which makes PELT slow on long signals)."""

        model = "cumsum_l2"
        min_size = 1

        def fit(self, signal: np.ndarray) -> _CumsumL2:
            y = np.asarray(signal, dtype=np.float64).reshape(len(signal), -1)
            self.signal = y
            self.c1 = np.concatenate([np.zeros((1, y.shape[1])), np.cumsum(y, 0)])
            self.c2 = np.concatenate([np.zeros((1, y.shape[1])), np.cumsum(y * y, 0)])
            return self

        def error(self, start: int, end: int) -> float:
            s1 = self.c1[end] - self.c1[start]
            return float((self.c2[end] - self.c2[start] - s1 * s1 / (end - start)).sum())

    return _CumsumL2


class PeltRule(Detector):
    """block: minimum block length (steps); max_points: cap on the signal length; stat: "range" |
    "var"; pen: penalty multiplier; min_size: shortest segment in blocks; factor: stable band above
    the lowest level (proportion scale, squared for "var"). `block_signal` reads the resolved
    values: call `fit()` first (`detect` does)."""

    name = "pelt"
    causal = False
    # resolved hyperparameters, set by `fit` (see `base.Detector`)
    block_: int
    max_points_: int
    stat_: str
    pen_: float
    min_size_: int
    factor_: float

    def __init__(
        self,
        *,
        block: int = 20,
        max_points: int = 250,
        stat: str = "range",
        pen: float = 4.0,
        min_size: int = 3,
        factor: float = 1.5,
    ) -> None:
        self.block = block
        self.max_points = max_points
        self.stat = stat
        self.pen = pen
        self.min_size = min_size
        self.factor = factor

    def _resolve(self) -> dict[str, Any]:
        block = int_param(self.block, "block", 2)
        max_points = int_param(self.max_points, "max_points", 10)
        if self.stat not in ("range", "var"):
            raise InputError(f"stat: expected 'range' or 'var', got {self.stat!r}")
        return {
            "block": block,
            "max_points": max_points,
            "stat": self.stat,
            "pen": pos_param(self.pen, "pen"),
            "min_size": int_param(self.min_size, "min_size", 1),
            "factor": pos_param(self.factor, "factor"),
        }

    def block_signal(self, inp: LoadInput) -> tuple[np.ndarray, int]:
        """Per-block mean-over-experts fluctuation [n_blocks, L] and the block length b."""
        p = inp.p
        S, L, E = p.shape
        b = max(self.block_, math.ceil(S / self.max_points_))
        nb = S // b
        if nb < 2:
            raise InputError(f"p: pelt needs at least 2 blocks of {b} steps, got {S} steps; lower block=")
        x = p[: nb * b].reshape(nb, b, L, E)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            per = np.nanmax(x, 1) - np.nanmin(x, 1) if self.stat_ == "range" else np.nanvar(x, 1, ddof=1)
            mask = np.arange(E)[None, :] < inp.experts[:, None]
            sig = np.nanmean(np.where(mask[None], per, np.nan), -1)
        return sig, b

    def detect(self, inp: LoadInput) -> StateResult:
        """Labels of every step (module docstring); validates the hyperparameters first (`fit`)."""
        self.fit()
        import ruptures

        S, L, _ = inp.p.shape
        sig, b = self.block_signal(inp)
        nb = sig.shape[0]
        labels = np.zeros((S, L), dtype=bool)
        fluct = np.full((S, L), np.nan)
        fluct[: nb * b] = np.repeat(sig, b, axis=0)
        fluct[nb * b :] = sig[-1]
        log_factor = math.log(self.factor_) * (2 if self.stat_ == "var" else 1)
        for li in range(L):
            y = np.log(np.maximum(sig[:, li], 1e-300))
            ok = np.isfinite(sig[:, li]) & (sig[:, li] > 0)
            if ok.sum() < 2:
                continue
            y = np.where(ok, y, np.nanmedian(y[ok]))
            d = np.diff(y)
            sigma = np.median(np.abs(d - np.median(d))) / 0.6745 / math.sqrt(2)
            sigma = max(sigma, 1e-3)
            ms = min(self.min_size_, max(1, nb // 2))
            algo = ruptures.Pelt(custom_cost=_cost_class()(), min_size=ms, jump=1).fit(y[:, None])
            bkps = algo.predict(pen=self.pen_ * sigma**2 * math.log(nb))
            starts = [0] + bkps[:-1]
            levels = [y[a:c].mean() for a, c in zip(starts, bkps)]
            low = min(levels)
            for a, c, lv in zip(starts, bkps, levels):
                stop = S if c == nb else c * b
                labels[a * b : stop, li] = lv <= low + log_factor
        return finish(labels, fluct, np.full((S, L), np.nan), inp.steps, self.name, self.params_)
