"""Predictor base class: validation, the fitted/not-fitted contract and simplex projection.

A forecaster writes only `_fit(p)` and `_predict(horizon)` (sktime's extension pattern); the base
class checks inputs, keeps the history, and turns whatever `_predict` returns into proportions.

Missing steps. A row of `p` that is NaN for every expert (a layer that saw no tokens in that step)
is forward-filled from the previous valid row of that layer (back-filled at the start; a layer
with no valid row at all becomes uniform). An expert column that is NaN in every valid row of a
layer (padding of a layer with fewer experts) is treated as a non-existent expert: proportion 0,
and forecasts keep it at 0. Any other NaN (part of a row) is an InputError.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moeload._estimator import Estimator
from moeload.errors import InputError, NotFittedError
from moeload.states._input import check_proportions


def _fill_missing(p: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Forward-fill all-NaN rows of p: [T, L, E] (mask: [L, E] real experts) -> [T, L, E] without NaN."""
    missing_row = np.isnan(p).all(axis=2)  # [T, L]
    if not missing_row.any():
        return p
    T, L, E = p.shape
    valid_row = ~missing_row
    idx = np.where(valid_row, np.arange(T)[:, None], -1)
    idx = np.maximum.accumulate(idx, axis=0)  # last valid row at or before t
    first = np.where(valid_row.any(axis=0), valid_row.argmax(axis=0), -1)  # [L]
    idx = np.where(idx < 0, first[None, :], idx)
    layers = np.arange(L)[None, :]
    filled = p[np.maximum(idx, 0), layers]  # [T, L, E]
    n_exist = np.maximum(mask.sum(axis=1), 1)
    uniform = np.broadcast_to(mask / n_exist[:, None], filled.shape)
    return np.where((idx < 0)[:, :, None], uniform, filled)


def validate_proportions(p: Any, name: str = "p") -> tuple[np.ndarray, np.ndarray]:
    """Check proportions with the one validator (`states._input.check_proportions`: shapes, NaN
    rows and padding, sign, row sums within its ROW_SUM_TOL) and fill missing rows.

    p: [T, L, E] (or [T, E] for one layer) non-negative, rows summing to 1 over experts.
    Returns (p [T, L, E] float64, rows renormalised exactly; expert mask [L, E] bool).
    """
    arr, mask = check_proportions(p, name)
    return _fill_missing(arr, mask), mask


def to_simplex(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Clip negatives, zero non-existent experts and renormalise. x: [H, L, E]; mask: [L, E]."""
    x = np.where(np.isfinite(x), x, 0.0)
    x = np.clip(x, 0.0, None) * mask[None]
    s = x.sum(axis=2, keepdims=True)
    n_exist = np.maximum(mask.sum(axis=1), 1)[None, :, None]
    uniform = np.broadcast_to(mask[None] / n_exist, x.shape)
    return np.where(s > 0, x / np.where(s > 0, s, 1.0), uniform)


class Predictor(Estimator):
    """Forecaster of expert load proportions.

    `fit(p)` with p: [T, L, E] -> self; `predict(horizon)` -> [horizon, L, E] rows on the simplex;
    `update(new_p: [t, L, E])` -> self. Hyperparameters follow `moeload._estimator.Estimator`: a
    subclass's keyword-only `__init__` only stores them (`get_params` / `set_params` read and change
    them); `_fit` validates them (InputError) and keeps what `_predict` / `_update` need in fitted
    attributes. Fitted attributes end in `_`: `cutoff_` (steps seen), `history_` ([cutoff_, L, E],
    missing rows filled), `mask_` ([L, E] experts that exist).
    """

    name: str = ""
    multi_run: bool = False  # True where fit accepts a list of runs
    # fitted state, set by `fit` (declared here for type checkers; absent until then)
    cutoff_: int
    history_: np.ndarray  # [cutoff_, L, E]
    mask_: np.ndarray  # [L, E] bool

    # --- public API --------------------------------------------------------------------------
    def fit(self, p: Any) -> Predictor:
        """Fit on proportions p: [T, L, E] (a list of such arrays, one per run, where `multi_run`). Returns self.

        Bad input or a bad hyperparameter -> InputError, and the predictor is left unfitted."""
        try:
            self._fit_input(p)
        except BaseException:
            for key in [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]:
                delattr(self, key)
            raise
        return self

    def predict(self, horizon: int) -> np.ndarray:
        """Forecast the next `horizon` steps after `cutoff_`. Returns [horizon, L, E] on the simplex."""
        self._check_fitted()
        if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon < 1:
            raise InputError(f"horizon: expected a positive integer, got {horizon!r}")
        raw = np.asarray(self._predict(int(horizon)), dtype=np.float64)
        L, E = self.mask_.shape
        if raw.shape != (horizon, L, E):
            raise RuntimeError(f"{type(self).__name__}._predict returned {raw.shape}, expected {(horizon, L, E)}")
        return to_simplex(raw, self.mask_)

    def update(self, new_p: Any) -> Predictor:
        """Append new_p: [t, L, E] to the history and refresh the fit. Returns self."""
        self._check_fitted()
        arr, _ = validate_proportions(new_p, "new_p")
        if arr.shape[1:] != self.history_.shape[1:]:
            raise InputError(f"new_p: shape {arr.shape[1:]} per step, fitted on {self.history_.shape[1:]}")
        arr = arr * self.mask_[None]
        arr = to_simplex(arr, self.mask_)
        self.history_ = np.concatenate([self.history_, arr], axis=0)
        self.cutoff_ = self.history_.shape[0]
        self._update(arr)
        return self

    # --- for subclasses ----------------------------------------------------------------------
    def _fit(self, p: np.ndarray) -> None:
        """Estimate state from p: [T, L, E] (validated, on the simplex)."""
        raise NotImplementedError

    def _fit_runs(self, runs: Sequence[np.ndarray]) -> None:
        """Fit on several runs; default: the last run only (single-run families)."""
        self._fit(runs[-1])

    def _predict(self, horizon: int) -> np.ndarray:
        """Raw forecast [horizon, L, E]; the base class projects it onto the simplex."""
        raise NotImplementedError

    def _update(self, new_p: np.ndarray) -> None:
        """Default: refit on the extended `history_`. new_p: [t, L, E]."""
        self._fit(self.history_)

    # --- helpers -----------------------------------------------------------------------------
    def _fit_input(self, p: Any) -> None:
        """Check p (one run or a list of runs), keep its history and call `_fit_runs`."""
        if isinstance(p, (list, tuple)) and len(p) > 0 and all(isinstance(r, np.ndarray) and r.ndim >= 2 for r in p):
            if not self.multi_run and len(p) > 1:
                raise InputError(
                    f"p: {self.name or type(self).__name__} fits one run, got a list of {len(p)}; "
                    "pass one [T, L, E] array"
                )
            runs = [validate_proportions(r, f"p[{i}]") for i, r in enumerate(p)]
            shapes = {r[0].shape[1:] for r in runs}
            if len(shapes) != 1:
                raise InputError(f"p: runs have different [L, E] shapes {sorted(shapes)}")
            self._set_state(runs[-1][0], runs[-1][1])
            self._fit_runs([r[0] for r in runs])
        else:
            arr, mask = validate_proportions(p)
            self._set_state(arr, mask)
            self._fit_runs([arr])

    def _set_state(self, p: np.ndarray, mask: np.ndarray) -> None:
        self.history_ = p
        self.mask_ = mask
        self.cutoff_ = p.shape[0]

    def _check_fitted(self) -> None:
        if not hasattr(self, "cutoff_"):
            raise NotFittedError(f"{type(self).__name__}: call fit(p) before predict/update")
