"""`mean_revert`: a window mean pulled towards a long-run target, at a rate fit across runs.

Per layer l and expert e, with m_w the mean of the last `window` steps and t_e the target
(1 / E_l for `target="uniform"`, the mean of the last `long_window` steps for `target="long"`),

    p_hat(h) = t_e + s_l (m_w - t_e) rho^h,        h = 1 .. horizon,

so the horizon-average forecast is t + s (m_w - t) rho (1 - rho^H) / ((1 - rho) H). `rho` is the
pull per step (1 = none). s_l = clip(1 - shrink N_l / D_l, 0, 1) shrinks the deviation when it is
mostly window noise: N_l = mean_e var_j(b_j) / k, the variance of the window mean estimated from the
k = n // block means b_j of consecutive `block`-step blocks at the end of the window (n steps; blocks
keep routing noise that is correlated over a few steps; block = 1 when k < 2),
D_l = mean_e (m_w - t_e)^2; shrink = 0 turns it off. Every term sums to 0 over a layer's experts,
so the forecast stays a distribution.

Defaults (`None`) come from `moeload.predictors._defaults.MEAN_REVERT[regime]`, fit across runs of
the project's own traces by benchmarks/forecast_defaults.py: `regime="aux"` for routers trained
with an auxiliary load-balancing loss, `"bias"` for aux-loss-free expert-bias balancing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moeload.errors import InputError
from moeload.predictors._defaults import MEAN_REVERT
from moeload.predictors._util import check_float, check_int
from moeload.predictors.base import Predictor
from moeload.predictors.registry import register

TARGETS = ("uniform", "long")


def pull_terms(
    p: np.ndarray, mask: np.ndarray, window: int, block: int, target: str, long_window: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Target t [L, E], deviation m_w - t [L, E] and noise ratio N / D [L] after the last row of p: [T, L, E]."""
    win = p[-window:]  # [n, L, E]
    n = win.shape[0]
    m = win.mean(axis=0)
    # An expert that never received a token in the history stays at zero, as with every predictor:
    # the uniform target spreads over the experts that are alive.
    mask = mask & (np.nan_to_num(p).sum(axis=0) > 0)
    if target == "uniform":
        tgt = mask / np.maximum(mask.sum(axis=1, keepdims=True), 1)
    else:
        tgt = p[-long_window:].mean(axis=0)
    dev = (m - tgt) * mask
    n_exist = np.maximum(mask.sum(axis=1), 1)  # [L]
    b = block if n // block >= 2 else 1
    k = n // b
    blocks = win[n - k * b :].reshape((k, b) + m.shape).mean(axis=1)  # [k, L, E]
    noise = (blocks.var(axis=0, ddof=1) if k > 1 else np.zeros_like(m)).sum(axis=1) / n_exist / k  # [L]
    disp = (dev * dev).sum(axis=1) / n_exist  # [L]
    return tgt, dev, np.divide(noise, disp, out=np.zeros_like(noise), where=disp > 0)


@register("mean_revert")
class MeanRevert(Predictor):
    """Window mean pulled towards 1/E (or a long-window mean) by rho per step; defaults fit across runs."""

    def __init__(
        self,
        *,
        window: int | None = None,
        rho: float | None = None,
        shrink: float | None = None,
        block: int | None = None,
        target: str | None = None,
        long_window: int = 1600,
        regime: str = "aux",
    ) -> None:
        super().__init__()
        self.window = window
        self.rho = rho
        self.shrink = shrink
        self.block = block
        self.target = target
        self.long_window = long_window
        self.regime = regime

    def _params(self) -> dict[str, Any]:
        if self.regime not in MEAN_REVERT:
            raise InputError(f"regime: expected one of {sorted(MEAN_REVERT)}, got {self.regime!r}")
        d = MEAN_REVERT[self.regime]
        get = lambda k: d[k] if getattr(self, k) is None else getattr(self, k)  # noqa: E731
        target = get("target")
        if target not in TARGETS:
            raise InputError(f"target: expected one of {TARGETS}, got {target!r}")
        return {
            "window": check_int("window", get("window")),
            "rho": check_float("rho", get("rho"), 0.0, 1.0),
            "shrink": check_float("shrink", get("shrink"), 0.0, np.inf),
            "block": check_int("block", get("block")),
            "target": target,
            "long_window": check_int("long_window", self.long_window),
        }

    def _fit(self, p: np.ndarray) -> None:
        prm = self._params()
        self.params_ = prm
        tgt, dev, ratio = pull_terms(p, self.mask_, prm["window"], prm["block"], prm["target"], prm["long_window"])
        self.scale_ = np.clip(1.0 - prm["shrink"] * ratio, 0.0, 1.0)  # [L]
        self.target_ = tgt  # [L, E]
        self.deviation_ = dev * self.scale_[:, None]  # [L, E]

    def _predict(self, horizon: int) -> np.ndarray:
        decay = self.params_["rho"] ** np.arange(1, horizon + 1, dtype=np.float64)  # [H]
        return self.target_[None] + decay[:, None, None] * self.deviation_[None]
