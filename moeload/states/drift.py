"""A drift test between consecutive windows ("test" method).

The run is cut into consecutive windows of w steps (window k = steps k*w .. k*w + w - 1). At the
last step of window k >= 1 the mean proportions of windows k-1 (A) and k (B) are compared with a
Pearson-type statistic that allows for over-dispersed multinomial noise:
  X2 = sum_e (mB_e - mA_e)^2 / (pbar_e * phi * (1/nA + 1/nB)),   df = E' - 1,
pbar_e the pooled mean, nA, nB the valid steps, E' experts with pbar_e > 0 and
phi = sum_e (dA_e + dB_e) / 4 / pbar_e / (E' - 1) the per-step noise scale, dA_e the mean squared
successive difference of expert e inside window A (von Neumann: E[d] = 2 sigma^2 for independent
noise, and a slow drift inside the window barely inflates it, unlike the window variance). For
multinomial noise with n assignments phi = 1/n and the test is Pearson's chi-square; real routing
noise is larger, and phi absorbs it.
Evidence: ENTER when the p-value > alpha (no significant drift), EXIT otherwise; steps between
tests carry no evidence. Hysteresis with min_run tests. Causal: streaming gives the same labels.
The fluctuation reported is X2 / df (about 1 under no drift), held until the next test.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moeload.states._input import LoadInput, int_param, pos_param
from moeload.states.base import ENTER, EXIT, UNKNOWN, Detector, StateResult, finish, hysteresis


class DriftTest(Detector):
    """window: w steps per window; alpha: test level; min_run: consecutive tests to flip.
    `evidence` reads the resolved values: call `fit()` first (`detect` does)."""

    name = "test"
    causal = True
    # resolved hyperparameters, set by `fit` (see `base.Detector`)
    window_: int
    alpha_: float
    min_run_: int

    def __init__(self, *, window: int = 100, alpha: float = 1e-3, min_run: int = 2) -> None:
        self.window = window
        self.alpha = alpha
        self.min_run = min_run

    def _resolve(self) -> dict[str, Any]:
        return {
            "window": int_param(self.window, "window", 3),
            "alpha": pos_param(self.alpha, "alpha"),
            "min_run": int_param(self.min_run, "min_run"),
        }

    def test_pair(self, a: np.ndarray, b: np.ndarray, experts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """a, b: [w, L, E] windows -> (X2/df [L], p-value [L]); NaN where untestable."""
        from scipy import stats

        L = a.shape[1]
        ratio, pval = np.full(L, np.nan), np.full(L, np.nan)
        for li in range(L):
            E = int(experts[li])
            xa, xb = a[:, li, :E], b[:, li, :E]
            xa, xb = xa[~np.isnan(xa).any(1)], xb[~np.isnan(xb).any(1)]
            na, nb = len(xa), len(xb)
            if na < 2 or nb < 2:
                continue
            ma, mb = xa.mean(0), xb.mean(0)
            pbar = (na * ma + nb * mb) / (na + nb)
            use = pbar > 0
            df = int(use.sum()) - 1
            if df < 1:
                continue
            msd = (np.diff(xa, axis=0) ** 2).mean(0) + (np.diff(xb, axis=0) ** 2).mean(0)  # 2 x 2 sigma^2
            phi = (msd[use] / 4 / pbar[use]).sum() / df
            if phi <= 0:
                x2 = 0.0 if np.allclose(ma, mb) else np.inf
            else:
                x2 = float(((mb - ma)[use] ** 2 / (pbar[use] * phi * (1 / na + 1 / nb))).sum())
            ratio[li], pval[li] = x2 / df, float(stats.chi2.sf(x2, df))
        return ratio, pval

    def evidence(self, p: np.ndarray, experts: np.ndarray, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Codes [t, L] and X2/df [t, L] (held between tests, NaN before the first) for rows p [t, L, E]
        whose first row is step index `offset`; tests need both windows inside p."""
        w = self.window_
        S, L, _ = p.shape
        codes = np.full((S, L), UNKNOWN, dtype=np.int8)
        ratio = np.full((S, L), np.nan)
        first_end = max(2 * w - 1, offset + ((w - 1 - offset) % w))
        for end in range(first_end, offset + S, w):
            j = end - offset
            if j - 2 * w + 1 < 0:
                continue
            r, pv = self.test_pair(p[j - 2 * w + 1 : j - w + 1], p[j - w + 1 : j + 1], experts)
            ok = ~np.isnan(pv)
            codes[j, ok] = np.where(pv[ok] > self.alpha_, ENTER, EXIT)
            ratio[j:] = np.where(np.isnan(r), ratio[j:], r)
        return codes, ratio

    def detect(self, inp: LoadInput) -> StateResult:
        """Labels of every step (module docstring); validates the hyperparameters first (`fit`)."""
        self.fit()
        codes, ratio = self.evidence(inp.p, inp.experts)
        labels = np.stack([hysteresis(codes[:, li], self.min_run_)[0] for li in range(codes.shape[1])], axis=1)
        return finish(labels, ratio, np.full(ratio.shape, np.nan), inp.steps, self.name, self.params_)
