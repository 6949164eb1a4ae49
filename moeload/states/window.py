"""The paper's rule: rolling range / variance of each expert's proportion, thresholded per layer.

For expert e of layer l at step t, over the trailing window of the last `window` steps
(t - w + 1 .. t, steps with no tokens skipped): range = max - min of p[., l, e], var = sample
variance (ddof=1). The layer statistic is the mean (or max) over the layer's experts. A step gives
ENTER evidence when the statistic <= threshold, EXIT evidence when > exit_ratio * threshold;
`base.hysteresis` turns evidence into labels (min_run consecutive steps to flip).
Thresholds (docs/metrics.md gives the derivations):
  reference="late":  factor * median of the statistic over the last max(w, late_frac * S) steps
                     (offline only: it looks at the end of the run);
  reference="noise": factor * the statistic expected from multinomial sampling noise alone,
                     sigma_e^2 = pbar_e (1 - k pbar_e) * mean_t(1 / n_t) with n_t routed assignments
                     per step and k = top-k; E[range] = d2(m) * sigma_e (m valid steps in the window);
  reference=<float>: that absolute threshold, in the statistic's units.
For stat="var" the factor is squared (factor is always on the scale of proportions).
Confirmation (`base.confirmed_end`): a layer that ends stable counts as stable (boundary >= 0)
only if its final stable run has lasted >= confirm steps (default 3 * window), the statistic is
<= the threshold at >= min_under (0.9) of the last confirm steps, and its median over the later half
of them is not below (1 - max_decline) (0.85; squared for var) x the earlier half's; otherwise "not stable yet".
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import numpy as np

from moeload.errors import InputError
from moeload.states._input import LoadInput, int_param, pos_param
from moeload.states.base import (
    BETWEEN,
    ENTER,
    EXIT,
    UNKNOWN,
    Detector,
    StateResult,
    confirmed_end,
    final_run_length,
    finish,
    hysteresis,
)

DEFAULT_FACTOR = {"late": 1.5, "noise": 3.0}


def _pad_front(x: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([np.full((n,) + x.shape[1:], np.nan), x], axis=0)


def rolling_extreme(x: np.ndarray, w: int, fn: Any) -> np.ndarray:
    """Trailing-window max (fn=np.fmax) or min (np.fmin) along axis 0, NaN-skipping: x [S, ...] ->
    [S, ...]; out[t] over x[max(0, t-w+1) : t+1]. O(S log w) by doubling."""
    S = x.shape[0]
    m = _pad_front(x, w - 1)
    size = 1
    while 2 * size <= w:
        m = fn(m[:-size], m[size:])
        size *= 2
    return fn(m[:S], m[w - size : w - size + S])


def rolling_sum(x: np.ndarray, w: int) -> np.ndarray:
    """Trailing-window sum along axis 0 with NaN as 0: x [S, ...] -> [S, ...]."""
    c = np.cumsum(np.nan_to_num(x), axis=0)
    out = c.copy()
    out[w:] -= c[:-w]
    return out


def rolling_var(x: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trailing-window (mean, variance ddof=1, valid count) of x [S, ...] along axis 0, NaN-skipping."""
    valid = ~np.isnan(x)
    n = rolling_sum(valid.astype(np.float64), w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        centre = np.nan_to_num(np.nanmean(x, axis=0))
    y = np.where(valid, x - centre, 0.0)
    s1 = rolling_sum(y, w)
    s2 = rolling_sum(y * y, w)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / n
        var = np.maximum(s2 - s1 * mean, 0.0) / (n - 1)
    var[n < 2] = np.nan
    mean[n < 1] = np.nan
    return mean + centre, var, n


@functools.cache
def _d2_table(m_max: int) -> np.ndarray:
    """d2[m] = expected range of m independent standard normals (d2[0] = d2[1] = 0)."""
    x = np.linspace(-9, 9, 4001)
    phi = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    out = np.zeros(m_max + 1)
    for m in range(2, m_max + 1):
        out[m] = np.trapezoid(1 - phi**m - (1 - phi) ** m, x)
    return out


def d2(m: np.ndarray, m_max: int) -> np.ndarray:
    """Expected range of m standard normals, elementwise for integer-valued m [any] <= m_max."""
    return _d2_table(int(m_max))[np.clip(np.nan_to_num(m).astype(np.int64), 0, m_max)]


def _aggregate(x: np.ndarray, agg: str) -> np.ndarray:
    return x.mean(-1) if agg == "mean" else x.max(-1)


def _window_ok(p: np.ndarray, w: int, min_periods: int) -> tuple[np.ndarray, np.ndarray]:
    """([S, L] windows with >= min_periods steps with tokens and spanning w steps, [S, L] those steps)."""
    valid = ~np.isnan(p[:, :, 0])  # [S, L]; rows are all NaN or all numbers
    n = rolling_sum(valid.astype(np.float64), w)  # [S, L] steps with tokens in each window
    ok = n >= min_periods
    ok[: w - 1] = False  # a window must span w steps
    return ok, n


def window_statistic(
    p: np.ndarray,
    window: int,
    stat: str = "range",
    agg: str = "mean",
    experts: Any = None,
    min_periods: int | None = None,
) -> np.ndarray:
    """The window rule's fluctuation statistic: proportions p: [S, L, E] -> [S, L] float64.

    Per expert over the trailing window of `window` steps (steps with no tokens, all-NaN rows,
    skipped): range = max - min, or var = sample variance (ddof=1), in units of proportions
    (squared for var); `agg` ("mean" | "max") over the layer's experts. experts: [L] experts per
    layer (columns past them are padding and left out; default E). NaN where a window has fewer
    than `min_periods` steps with tokens (None = max(2, window // 2)) and for the first window - 1
    steps. `WindowRule` thresholds exactly this; `plots.fluctuation` draws it.
    """
    w = int_param(window, "window", 2)
    if stat not in ("range", "var"):
        raise InputError(f"stat: expected 'range' or 'var', got {stat!r}")
    if agg not in ("mean", "max"):
        raise InputError(f"agg: expected 'mean' or 'max', got {agg!r}")
    S, L, E = p.shape
    n_exp = np.full(L, E, np.int64) if experts is None else np.asarray(experts, dtype=np.int64).reshape(-1)
    if n_exp.shape != (L,) or (n_exp < 1).any() or (n_exp > E).any():
        raise InputError(f"experts: expected [L={L}] counts in 1..{E}, got {experts!r}")
    mp = int_param(max(2, w // 2) if min_periods is None else min_periods, "min_periods", 2)
    ok, _ = _window_ok(p, w, mp)
    fluct = np.full((S, L), np.nan)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        for li in range(L):
            x = np.ascontiguousarray(p[:, li, : int(n_exp[li])])  # [S, E_l]
            if stat == "range":
                per = rolling_extreme(x, w, np.fmax) - rolling_extreme(x, w, np.fmin)
            else:
                per = rolling_var(x, w)[1]
            fluct[:, li] = np.where(ok[:, li], _aggregate(per, agg), np.nan)
    return fluct


class WindowRule(Detector):
    """Rolling fluctuation thresholded with hysteresis. Hyperparameters as in the module docstring.

    window: w steps; stat: "range" | "var"; agg: "mean" | "max" over experts; reference: "late" |
    "noise" | float; factor: None = 1.5 (late) or 3.0 (noise); late_frac: share of the run used as
    the late level; min_run: steps of consistent evidence to flip (None = max(1, w // 5));
    exit_ratio: hysteresis band; min_periods: valid steps (with tokens) a window needs (None = w // 2);
    center: offline only, centre the window instead of trailing it (labels shift by (w - 1) // 2);
    confirm: steps a final stable phase must last to count (None = 3 * window, 0 = no confirmation);
    min_under, max_decline: the trailing checks of the confirmation (module docstring).
    `statistic`, `threshold` and `codes` read the resolved values: call `fit()` first (`detect` does).
    """

    name = "window"
    # resolved hyperparameters, set by `fit` (see `base.Detector`)
    window_: int
    stat_: str
    agg_: str
    reference_: str | float
    factor_: float
    late_frac_: float
    min_run_: int
    exit_ratio_: float
    min_periods_: int
    center_: bool
    confirm_: int
    min_under_: float
    max_decline_: float

    def __init__(
        self,
        *,
        window: int = 100,
        stat: str = "range",
        agg: str = "mean",
        reference: Any = "late",
        factor: float | None = None,
        late_frac: float = 0.2,
        min_run: int | None = None,
        exit_ratio: float = 1.25,
        min_periods: int | None = None,
        center: bool = False,
        confirm: int | None = None,
        min_under: float = 0.9,
        max_decline: float = 0.15,
    ) -> None:
        self.window = window
        self.stat = stat
        self.agg = agg
        self.reference = reference
        self.factor = factor
        self.late_frac = late_frac
        self.min_run = min_run
        self.exit_ratio = exit_ratio
        self.min_periods = min_periods
        self.center = center
        self.confirm = confirm
        self.min_under = min_under
        self.max_decline = max_decline

    def _resolve(self) -> dict[str, Any]:
        window = int_param(self.window, "window", 2)
        stat, agg, reference = self.stat, self.agg, self.reference
        if stat not in ("range", "var"):
            raise InputError(f"stat: expected 'range' or 'var', got {stat!r}")
        if agg not in ("mean", "max"):
            raise InputError(f"agg: expected 'mean' or 'max', got {agg!r}")
        if isinstance(reference, str):
            if reference not in DEFAULT_FACTOR:
                raise InputError(f"reference: expected 'late', 'noise' or a positive number, got {reference!r}")
        else:
            reference = pos_param(reference, "reference")
        factor = pos_param(DEFAULT_FACTOR.get(reference, 1.0) if self.factor is None else self.factor, "factor")
        late_frac = pos_param(self.late_frac, "late_frac")
        min_run = int_param(max(1, window // 5) if self.min_run is None else self.min_run, "min_run")
        exit_ratio = pos_param(self.exit_ratio, "exit_ratio")
        if exit_ratio < 1:
            raise InputError(f"exit_ratio: must be >= 1, got {self.exit_ratio}")
        min_periods = int_param(max(2, window // 2) if self.min_periods is None else self.min_periods, "min_periods", 2)
        confirm = int_param(3 * window if self.confirm is None else self.confirm, "confirm", 0)
        min_under = pos_param(self.min_under, "min_under")
        max_decline = pos_param(self.max_decline, "max_decline")
        if min_under > 1 or max_decline >= 1:
            raise InputError(f"min_under must be <= 1 and max_decline < 1, got {self.min_under}, {self.max_decline}")
        return {
            "window": window,
            "stat": stat,
            "agg": agg,
            "reference": reference,
            "factor": factor,
            "late_frac": late_frac,
            "min_run": min_run,
            "exit_ratio": exit_ratio,
            "min_periods": min_periods,
            "center": bool(self.center),
            "confirm": confirm,
            "min_under": min_under,
            "max_decline": max_decline,
        }

    @property
    def causal(self) -> bool:
        return self.reference != "late" and not self.center

    # -- statistics -------------------------------------------------------------------------
    def statistic(
        self, p: np.ndarray, inp: LoadInput, assignments: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Trailing-window layer statistic [S, L] (`window_statistic`) and, for reference="noise",
        its noise level [S, L]."""
        w = self.window_
        S, L, _ = p.shape
        if self.reference_ == "noise" and assignments is None:
            raise InputError(
                "reference='noise' needs routed assignments per step: pass integer counts, a Trace or tokens="
            )
        fluct = window_statistic(p, w, self.stat_, self.agg_, inp.experts, self.min_periods_)
        if self.reference_ != "noise" or assignments is None:  # assignments are checked above for "noise"
            return fluct, None
        ok, n = _window_ok(p, w, self.min_periods_)
        noise = np.full((S, L), np.nan)
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            for li in range(L):
                x = np.ascontiguousarray(p[:, li, : int(inp.experts[li])])  # [S, E_l]
                a = assignments[:, li]
                inv_n = np.where(a > 0, 1.0 / np.where(a > 0, a, 1), np.nan)
                inv_mean = rolling_sum(inv_n, w) / n[:, li]  # [S]
                mean = rolling_sum(x, w) / n[:, li, None]  # [S, E_l]
                k = float(inp.top_k[li])
                sig2 = np.maximum(mean * (1 - np.minimum(k * mean, 1.0)), 0.0) * inv_mean[:, None]
                ref = sig2 if self.stat_ == "var" else d2(n[:, li], w)[:, None] * np.sqrt(sig2)
                noise[:, li] = np.where(ok[:, li], _aggregate(ref, self.agg_), np.nan)
        return fluct, noise

    def codes(self, fluct: np.ndarray, thr: np.ndarray) -> np.ndarray:
        """Evidence codes [S, L] from statistic and entry threshold."""
        c = np.full(fluct.shape, BETWEEN, dtype=np.int8)
        c[fluct <= thr] = ENTER
        c[fluct > self.exit_ratio_ * thr] = EXIT
        c[np.isnan(fluct) | np.isnan(thr)] = UNKNOWN
        return c

    def threshold(self, fluct: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        """Entry threshold [S, L]."""
        f = self.factor_**2 if self.stat_ == "var" else self.factor_
        if self.reference_ == "noise":
            if noise is None:
                raise InputError(
                    "reference='noise' needs the noise level from statistic(); it had no routed assignments"
                )
            return f * noise
        if self.reference_ == "late":
            S = fluct.shape[0]
            n_late = min(S, max(self.window_, math.ceil(self.late_frac_ * S)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                lvl = np.nanmedian(fluct[S - n_late :], axis=0)
            return np.broadcast_to(f * lvl, fluct.shape).copy()
        return np.full(fluct.shape, float(self.reference_))

    # -- offline ----------------------------------------------------------------------------
    def detect(self, inp: LoadInput) -> StateResult:
        """Labels of every step (module docstring); validates the hyperparameters first (`fit`)."""
        self.fit()
        fluct, noise = self.statistic(inp.p, inp, inp.assignments)
        thr = self.threshold(fluct, noise)
        codes = self.codes(fluct, thr)
        if self.center_:
            shift = (self.window_ - 1) // 2
            codes = np.concatenate([codes[shift:], np.full((shift,) + codes.shape[1:], UNKNOWN, np.int8)])
            fluct = np.concatenate([fluct[shift:], np.full((shift,) + fluct.shape[1:], np.nan)])
            thr = np.concatenate([thr[shift:], np.full((shift,) + thr.shape[1:], np.nan)])
        labels = np.stack([hysteresis(codes[:, li], self.min_run_)[0] for li in range(codes.shape[1])], axis=1)
        dec = self.max_decline_ if self.stat_ == "range" else 1 - (1 - self.max_decline_) ** 2  # var: squared scale
        ok = confirmed_end(final_run_length(labels), fluct, thr, self.confirm_, self.min_under_, dec)
        return finish(labels, fluct, thr, inp.steps, self.name, self.params_, ok)
