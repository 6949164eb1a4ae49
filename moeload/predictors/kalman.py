"""`kalman`: local-level Kalman filter per series, noise ratio estimated from the data.

Model per expert: p_t = mu_t + eps_t, mu_t = mu_{t-1} + eta_t. The differences d_t = p_t - p_{t-1}
have autocovariances g0 = s_eta + 2 s_eps and g1 = -s_eps, so q = s_eta / s_eps = (g0 + 2 g1) / -g1
(moment estimator, floored at `q_min`; pooled per layer or over everything with `pool`). The
steady-state filter is an EMA with gain K = P / (P + 1), P = (q + sqrt(q^2 + 4 q)) / 2, run over
the history for every series at once; the forecast is the filtered level, held flat. `update`
continues the filter with the fitted gains (no re-estimation; with `block > 1` it refits).

Correlated noise. Real routing noise is not white over a few steps (on the DeepSpeed traces the
100-step means scatter ~3x more than independent steps would give), which makes the lag-1
estimator see almost no level noise (q at its floor, the filter stuck near its start). With
`block=b > 1`, q is estimated on means of b consecutive steps (noise correlated over fewer than b
steps is then nearly white) and converted to steps: a block's level noise is b s_eta and its
observation noise s_eps / b, so q_step = q_block / b^2.
"""

from __future__ import annotations

import numpy as np

from moeload.errors import InputError
from moeload.predictors._util import check_float, check_int, ema_last
from moeload.predictors.base import Predictor
from moeload.predictors.registry import register


def noise_ratio(p: np.ndarray, pool: str = "series", q_min: float = 1e-8) -> np.ndarray:
    """Moment estimate of q = var(level noise) / var(observation noise). p: [T, L, E] -> [L, E]."""
    L, E = p.shape[1:]
    if p.shape[0] < 3:
        return np.full((L, E), 1.0)
    d = np.diff(p, axis=0)
    d = d - d.mean(axis=0)
    g0 = (d * d).mean(axis=0)
    g1 = (d[1:] * d[:-1]).mean(axis=0)
    axes = {"series": None, "layer": (1,), "all": (0, 1)}[pool]
    if axes is not None:
        g0 = np.broadcast_to(g0.mean(axis=axes, keepdims=True), (L, E))
        g1 = np.broadcast_to(g1.mean(axis=axes, keepdims=True), (L, E))
    s_eps = np.maximum(-g1, 0.0)
    s_eta = np.maximum(g0 + 2.0 * g1, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s_eps > 0, s_eta / np.where(s_eps > 0, s_eps, 1.0), np.where(g0 > 0, 1e6, 1.0))
    return np.maximum(q, q_min)


def steady_gain(q: np.ndarray) -> np.ndarray:
    """Steady-state Kalman gain of the local-level model with noise ratio q: [...] -> [...]."""
    P = 0.5 * (q + np.sqrt(q * q + 4.0 * q))
    return P / (P + 1.0)


@register("kalman")
class LocalLevelKalman(Predictor):
    """Local-level model per (layer, expert), vectorised; flat forecast of the filtered level."""

    def __init__(
        self, *, pool: str = "layer", q_min: float = 1e-7, max_history: int | None = None, block: int = 1
    ) -> None:
        super().__init__()
        self.pool = pool
        self.q_min = q_min
        self.max_history = max_history
        self.block = block

    def _fit(self, p: np.ndarray) -> None:
        if self.pool not in ("series", "layer", "all"):
            raise InputError(f"pool: expected 'series', 'layer' or 'all', got {self.pool!r}")
        q_min = check_float("q_min", self.q_min, 0.0, np.inf)
        if self.max_history is not None:
            p = p[-check_int("max_history", self.max_history) :]
        b = self.block_ = check_int("block", self.block)
        if b > 1 and p.shape[0] >= 3 * b:
            n = p.shape[0] // b
            blocks = p[p.shape[0] - n * b :].reshape(n, b, *p.shape[1:]).mean(axis=1)
            self.q_ = np.maximum(noise_ratio(blocks, self.pool, 0.0) / (b * b), q_min)  # [L, E]
        else:
            self.q_ = noise_ratio(p, self.pool, q_min)  # [L, E]
        self.gain_ = steady_gain(self.q_)  # [L, E]
        self.level_ = ema_last(p, self.gain_)  # [L, E]

    def _update(self, new_p: np.ndarray) -> None:
        if self.block_ > 1:  # the block estimate needs many blocks: re-estimate as history grows
            self._fit(self.history_)
        else:
            self.level_ = ema_last(new_p, self.gain_, self.level_)

    def _predict(self, horizon: int) -> np.ndarray:
        return np.broadcast_to(self.level_, (horizon,) + self.level_.shape).copy()
