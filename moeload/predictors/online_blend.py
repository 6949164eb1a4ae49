"""`online_blend`: a blend of window means whose weights are learned on the run's own past.

Forecast of the mean share over the next `horizon` steps, per layer l and expert e,

    f = sum_k a_k m_k + a_u / E_l,        a >= 0, sum(a) = 1  (`nonneg=True`)

with m_k the mean of the last windows[k] steps (clipped at the start of the history) and 1 / E_l
uniform over the layer's live experts (`uniform_term`). The weights are learned at every forecast
from the history itself, nothing fit on other runs: training origins o_j = j * `stride` >=
`min_origin` (the last `max_pairs` of them) whose targets, the mean share over [o_j, o_j + h), lie
inside the history, weighted by 0.5 ** (age / `halflife`) with age = steps from o_j to the newest
training origin (None: equal weights); least squares over those origins and all experts (one
weight vector per layer with `pool="layer"`, pooled over layers with `pool="model"`), ridge-shrunk
towards the best single feature on the same pairs (penalty `ridge` x that feature's mean squared
error x |a - e_best|^2). h = horizon where the history holds `min_pairs` training origins for it
and, with `fresh`, where the training origins span at least half of the history after
`min_origin`; else the longest h that does (the weights of a shorter horizon stand in). With
fewer than `min_pairs` origins even at h = `stride` the forecast is the mean of the last
`fallback` steps. `nonneg=False` drops a >= 0 (weights still sum to 1, so the forecast stays a
distribution before clipping). The forecast is held flat over the horizon, at the level learned for
`horizon` (a backtest that scores the first h' < horizon steps of one forecast scores that level,
not one learned for h'). After `predict`, `weights_` [G, K] (G = L or 1) and `horizon_fit_` (h; 0
for the fallback) say what was used.

Defaults: chosen by benchmarks/forecast_defaults.py-style backtests (H = 1,000 / 2,000, ratio to
SW_Avg at its best window) on gpt3-small-moe-s0, gpt3-small-moe-bias-s0 and gpt3-small-moe-aux-s0
(see docs/forecast-accuracy.md, "online_blend"); they are hyperparameters, no fitted constants.

Cost per forecast: features at n <= max_pairs origins, O(n L E K) time and memory (K features)
plus one K x K non-negative solve per pool; `update` appends to a cumulative sum [T + 1, L, E]
(benchmarks/forecast_defaults.py --test prints update + predict per backtest origin: 5.0 ms on the
10,000-step 6 x 16 run, 18 ms on a 600-step 12 x 128 run, the first call importing scipy.optimize).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moeload.errors import InputError
from moeload.predictors._util import check_float, check_int
from moeload.predictors._windows import cumsum0, window_mean
from moeload.predictors.base import Predictor
from moeload.predictors.registry import register

WINDOWS = (25, 50, 100, 200, 400, 800, 1600, 3200)
POOLS = ("model", "layer")


def solve_weights(Q: np.ndarray, q: np.ndarray, yy: float, ridge: float, nonneg: bool) -> np.ndarray:
    """Weights a [K] minimising a'Qa - 2a'q + yy + ridge * mse_best * |a - e_best|^2 with sum(a) = 1
    (and a >= 0 where `nonneg`). Q: [K, K] mean outer product of features, q: [K] mean feature x
    target, yy: mean squared target; e_best is the single feature with the smallest mean squared error."""
    from scipy.optimize import nnls  # lazily: importing moeload.predictors stays light

    K = q.shape[0]
    mse = np.diag(Q) - 2 * q + yy  # [K] error of each single feature
    best = int(np.argmin(mse))
    lam = ridge * max(float(mse[best]), 0.0)
    scale = max(float(np.trace(Q)) / K, 1e-30)
    A = Q + (lam + 1e-9 * scale) * np.eye(K)
    b = q + lam * np.eye(K)[best]
    if not nonneg:  # equality-constrained least squares, closed form
        x, u = np.linalg.solve(A, b), np.linalg.solve(A, np.ones(K))
        return x + (1 - x.sum()) / u.sum() * u
    R = np.linalg.cholesky(A).T  # A = R'R: |R a - R^-T b|^2 = a'Aa - 2a'b + const
    big = np.sqrt(1e6 * scale)
    M = np.vstack([R, np.full((1, K), big)])
    rhs = np.concatenate([np.linalg.solve(R.T, b), [big]])
    a = nnls(M, rhs, maxiter=50 * K)[0]
    return a / a.sum() if a.sum() > 0 else np.eye(K)[best]


@register("online_blend")
class OnlineBlend(Predictor):
    """Window means + 1/E blended by weights fit at each forecast on the run's own past origins."""

    def __init__(
        self,
        *,
        windows: Sequence[int] = WINDOWS,
        uniform_term: bool = True,
        stride: int = 25,
        max_pairs: int = 80,
        min_pairs: int = 4,
        ridge: float = 1.0,
        pool: str = "layer",
        nonneg: bool = True,
        fallback: int = 50,
        halflife: float | None = 125.0,
        min_origin: int = 100,
        fresh: bool = True,
    ) -> None:
        super().__init__()
        self.windows = windows
        self.uniform_term = uniform_term
        self.stride = stride
        self.max_pairs = max_pairs
        self.min_pairs = min_pairs
        self.ridge = ridge
        self.pool = pool
        self.nonneg = nonneg
        self.fallback = fallback
        self.halflife = halflife
        self.min_origin = min_origin
        self.fresh = fresh

    def _fit(self, p: np.ndarray) -> None:
        ws = self.windows
        if isinstance(ws, (str, bytes)) or not isinstance(ws, Sequence) or len(ws) == 0:
            raise InputError(f"windows: expected a non-empty sequence of integers >= 1, got {ws!r}")
        if self.pool not in POOLS:
            raise InputError(f"pool: expected one of {POOLS}, got {self.pool!r}")
        self.windows_ = tuple(check_int("windows", w) for w in ws)
        self.stride_ = check_int("stride", self.stride)
        self.max_pairs_ = check_int("max_pairs", self.max_pairs)
        self.min_pairs_ = check_int("min_pairs", self.min_pairs)
        self.ridge_ = check_float("ridge", self.ridge, 0.0, np.inf)
        self.fallback_ = check_int("fallback", self.fallback)
        self.min_origin_ = check_int("min_origin", self.min_origin)
        self.halflife_ = None if self.halflife is None else check_float("halflife", self.halflife, 1e-9, np.inf)
        self.c_ = cumsum0(p)  # [T + 1, L, E]
        alive = self.mask_ & (p.sum(axis=0) > 0)  # experts that ever received a token
        self.uniform_ = alive / np.maximum(alive.sum(axis=1, keepdims=True), 1)  # [L, E]

    def _update(self, new_p: np.ndarray) -> None:
        add = self.c_[-1] + np.cumsum(new_p, axis=0)
        self.c_ = np.concatenate([self.c_, add], axis=0)
        alive = self.mask_ & (self.c_[-1] > 0)
        self.uniform_ = alive / np.maximum(alive.sum(axis=1, keepdims=True), 1)

    def _features(self, ends: np.ndarray) -> np.ndarray:
        """Features [n, L, E, K] at origins `ends` (number of steps seen)."""
        f = [window_mean(self.c_, ends, w) for w in self.windows_]
        if self.uniform_term:
            f.append(np.broadcast_to(self.uniform_, f[0].shape))
        return np.stack(f, axis=-1)

    def _weights(self, horizon: int) -> tuple[np.ndarray | None, int]:
        """(weights [G, K] for G = 1 or L pools, or None for the fallback; horizon they were fit for)."""
        T, s = self.cutoff_, self.stride_
        first = -(-self.min_origin_ // s)  # first training origin index: o_j >= min_origin
        h = min(horizon, T - s * (first + self.min_pairs_ - 1))
        if self.fresh:  # training origins span at least half of the history after min_origin
            h = min(h, (T - first * s) // 2)
        if h < s:
            return None, 0
        last = (T - h) // s
        j = np.arange(max(first, last - self.max_pairs_ + 1), last + 1)
        ends = j * s
        wt = np.ones(len(ends)) if self.halflife_ is None else 0.5 ** ((T - h - ends) / self.halflife_)  # [n]
        X = self._features(ends) * self.mask_[None, :, :, None]  # [n, L, E, K]
        y = window_mean(self.c_, ends + h, h) * self.mask_[None]  # [n, L, E]
        per_layer = self.mask_.sum(axis=1) * wt.sum()  # [L]
        n = np.maximum(np.atleast_1d(per_layer.sum() if self.pool == "model" else per_layer), 1e-30)
        Q = np.einsum("nlek,nlem,n->lkm", X, X, wt)
        q = np.einsum("nlek,nle,n->lk", X, y, wt)
        yy = np.einsum("nle,nle,n->l", y, y, wt)
        if self.pool == "model":
            Q, q, yy = Q.sum(0, keepdims=True), q.sum(0, keepdims=True), yy.sum(0, keepdims=True)
        a = np.stack(
            [
                solve_weights(Q[g] / n[g], q[g] / n[g], float(yy[g] / n[g]), self.ridge_, bool(self.nonneg))
                for g in range(len(n))
            ]
        )
        return a, h

    def _predict(self, horizon: int) -> np.ndarray:
        a, h = self._weights(horizon)
        self.horizon_fit_ = h
        if a is None:
            level = window_mean(self.c_, self.cutoff_, self.fallback_)  # [L, E]
        else:
            self.weights_ = a  # [1 or L, K]
            X = self._features(np.array([self.cutoff_]))[0]  # [L, E, K]
            level = np.einsum("lek,lk->le", X, np.broadcast_to(a, (X.shape[0], a.shape[1])))
        return np.broadcast_to(level, (horizon,) + level.shape).copy()
