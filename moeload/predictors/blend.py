"""`blend`: a fixed linear blend of multi-scale window means, with weights learned on other runs.

This is "train on one run, test on another": `learn_blend(runs, horizon)` fits, by ridge regression
over many origins of finished runs (every `stride` steps, all layers and experts pooled), the
weights of the forecast

    f = m_ref + sum_k c_k (m_k - m_ref) + c_u (1 / E_l - m_ref)

of the mean share over the next `horizon` steps, where m_k is the mean of the last windows[k]
steps (clipped at the start of the history), m_ref = m_{windows[ref]} and E_l the number of
experts of the layer. A blend of window means is a kernel over the history: it can smooth, give a
short window more weight, extrapolate drift (e.g. 2 m_100 - m_400) or pull towards uniform
(c_u > 0; c_u < 0 pushes away from it). Every term sums to 0 over a layer's experts, so the
forecast stays a distribution before clipping; no intercept is fitted. The returned dict goes
straight into `get("blend", **learned)`; the predictor itself only applies the weights (no fitting
on the forecast run beyond its window means) and holds the forecast flat for every step. With
`coef=None` it is the plain mean of the reference window.

Phases: with `learn_blend(..., by_phase=True)` the origins are split by the `moeload.states`
window label of their layer at the step before the origin, and a second weight vector
`coef_transient` is learned for transient origins; the predictor then labels its own history the
same way and uses, per layer, the weights of the layer's label at its last step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moeload.errors import InputError
from moeload.predictors._util import check_int
from moeload.predictors._windows import cumsum0, window_mean
from moeload.predictors.base import Predictor, validate_proportions
from moeload.predictors.registry import register

WINDOWS = (25, 50, 100, 200, 400, 800, 1600)


def blend_features(
    c: np.ndarray, ends: np.ndarray, windows: Sequence[int], ref: int, mask: np.ndarray, uniform_term: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Features [n, L, E, k] and reference mean [n, L, E] at origins `ends` from cumsum c: [T + 1, L, E].

    k = len(windows) - 1 window differences m_w - m_ref, plus 1 / E_l - m_ref when `uniform_term`.
    mask: [L, E] experts that exist (padding gets zero features)."""
    means = np.stack([window_mean(c, ends, w) for w in windows], axis=-1)  # [n, L, E, K]
    refv = means[..., ref]
    feats = [np.delete(means, ref, axis=-1) - refv[..., None]]
    if uniform_term:
        uni = mask / np.maximum(mask.sum(axis=1, keepdims=True), 1)  # [L, E]
        feats.append((uni[None] - refv)[..., None])
    X = np.concatenate(feats, axis=-1) * mask[None, :, :, None]
    return X, refv


def _stable_labels(p: np.ndarray) -> np.ndarray:
    """moeload.states window labels [T, L] (True = stable) of proportions p: [T, L, E]."""
    import moeload.states as states

    return np.asarray(states.detect(p).labels, dtype=bool)


def learn_blend(
    runs: Sequence[np.ndarray] | np.ndarray,
    horizon: int,
    *,
    windows: Sequence[int] = WINDOWS,
    ref: int = 2,
    uniform_term: bool = True,
    stride: int = 25,
    min_history: int = 100,
    alphas: Sequence[float] = tuple(np.logspace(-6, 2, 9)),
    by_phase: bool = False,
) -> dict[str, Any]:
    """Weights of `blend` for `horizon`, learned on finished runs.

    runs: one [T, L, E] proportions array or a list of them (same [L, E] not required). Origins are
    every `stride` steps from `min_history` to T - horizon. Returns {"windows", "ref", "coef",
    "uniform_term"} (and "coef_transient" with `by_phase`; then "coef" is learned on stable
    origins only) for `get("blend", **result)`; each coef has len(windows) - 1 (+ 1) numbers.
    """
    from sklearn.linear_model import RidgeCV

    runs = [runs] if isinstance(runs, np.ndarray) else list(runs)
    h = check_int("horizon", horizon)
    ws = [check_int("windows", w) for w in windows]
    if not 0 <= ref < len(ws):
        raise InputError(f"ref: expected an index into windows (0..{len(ws) - 1}), got {ref!r}")
    Xs, ys, st = [], [], []
    for i, r in enumerate(runs):
        p, mask = validate_proportions(r, f"runs[{i}]")
        ends = np.arange(check_int("min_history", min_history), p.shape[0] - h + 1, check_int("stride", stride))
        if ends.size == 0:
            continue
        c = cumsum0(p)
        X, refv = blend_features(c, ends, ws, ref, mask, uniform_term)
        y = window_mean(c, ends + h, h) - refv
        keep = np.broadcast_to(mask[None], y.shape)
        Xs.append(X[keep])
        ys.append(y[keep])
        lab = _stable_labels(p)[ends - 1] if by_phase else np.ones(y.shape[:2], dtype=bool)  # [n, L]
        st.append(np.broadcast_to(lab[:, :, None], y.shape)[keep])
    if not Xs:
        raise InputError(f"runs: no run is longer than min_history + horizon = {min_history + h} steps")
    X, y, stable = np.concatenate(Xs), np.concatenate(ys), np.concatenate(st)

    def fit(sel: np.ndarray) -> tuple[float, ...]:
        if not sel.any():
            return tuple(0.0 for _ in range(X.shape[1]))  # no origins of this phase: the reference mean
        return tuple(float(v) for v in RidgeCV(alphas=tuple(alphas), fit_intercept=False).fit(X[sel], y[sel]).coef_)

    out: dict[str, Any] = {
        "windows": tuple(ws),
        "ref": int(ref),
        "coef": fit(stable),
        "uniform_term": bool(uniform_term),
    }
    if by_phase:
        out["coef_transient"] = fit(~stable)
    return out


@register("blend")
class WindowBlend(Predictor):
    """m_ref + fixed weights x (window-mean differences, pull to uniform); weights from `learn_blend`."""

    def __init__(
        self,
        *,
        windows: Sequence[int] = WINDOWS,
        ref: int = 2,
        coef: Sequence[float] | None = None,
        uniform_term: bool = True,
        coef_transient: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.windows = windows
        self.ref = ref
        self.coef = coef
        self.uniform_term = uniform_term
        self.coef_transient = coef_transient

    def _coef(self, name: str, value: Any, k: int, n_windows: int) -> np.ndarray:
        coef = np.zeros(k) if value is None else np.asarray(value, dtype=np.float64)
        if coef.shape != (k,) or not np.isfinite(coef).all():
            raise InputError(
                f"{name}: expected {k} finite numbers for {n_windows} windows"
                f"{' and the uniform term' if self.uniform_term else ''}, got {value!r}"
            )
        return coef

    def _fit(self, p: np.ndarray) -> None:
        ws = [check_int("windows", w) for w in self.windows]
        ref = self.ref
        if isinstance(ref, bool) or not isinstance(ref, (int, np.integer)) or not 0 <= ref < len(ws):
            raise InputError(f"ref: expected an index into windows (0..{len(ws) - 1}), got {self.ref!r}")
        k = len(ws) - 1 + bool(self.uniform_term)
        coef = self._coef("coef", self.coef, k, len(ws))
        c = cumsum0(p[-max(ws) :])
        X, refv = blend_features(c, np.array([c.shape[0] - 1]), ws, int(ref), self.mask_, bool(self.uniform_term))
        self.level_ = refv[0] + X[0] @ coef  # [L, E]
        self.stable_ = np.ones(p.shape[1], dtype=bool)  # [L] label at the last step (all stable without phases)
        if self.coef_transient is not None:
            coef_t = self._coef("coef_transient", self.coef_transient, k, len(ws))
            self.stable_ = _stable_labels(p)[-1]
            self.level_ = np.where(self.stable_[:, None], self.level_, refv[0] + X[0] @ coef_t)

    def _predict(self, horizon: int) -> np.ndarray:
        return np.broadcast_to(self.level_, (horizon,) + self.level_.shape).copy()
