"""Forecast error metrics for one origin and horizon, per layer (definitions: docs/metrics.md).

Notation: y: [H, L, E] realised proportions (rows of steps without tokens are NaN and excluded),
f: [H, L, E] forecast, only the first E_l experts of layer l count (the rest is padding).
  mae_pp       = 100 * mean_{t,e} |f - y|                    (percentage points)
  rmse_pp      = 100 * sqrt(mean_{t,e} (f - y)^2)
  mre          = mean_{t,e: y>0} |f - y| / y                  (entries with y = 0 are left out)
  havg_mae_pp  = 100 * mean_e |mean_t f - mean_t y|           (the horizon-average share)
  maxload_err  = |max_g F_g - max_g Y_g| / max_g Y_g,  F_g = sum_{e on g} mean_t f, same for Y
Means over t use the steps where y is valid, for f as well, so both sides cover the same steps.
"""

from __future__ import annotations

import warnings

import numpy as np

METRICS = ("mae_pp", "rmse_pp", "mre", "havg_mae_pp", "maxload_err")


def contiguous_map(experts: np.ndarray, E: int, num_gpus: int) -> np.ndarray:
    """[L, E] GPU of each expert when E_l experts are split into num_gpus contiguous blocks
    (expert e -> e * G // E_l); padding columns get -1."""
    L = len(experts)
    out = np.full((L, E), -1, dtype=np.int64)
    for li, el in enumerate(experts):
        g = min(num_gpus, int(el))
        out[li, :el] = np.arange(el) * g // el
    return out


def error_metrics(f: np.ndarray, y: np.ndarray, experts: np.ndarray, gpu_map: np.ndarray) -> dict[str, np.ndarray]:
    """f, y: [H, L, E]; experts: [L]; gpu_map: [L, E] (-1 = padding, left out). Returns metric -> [L], plus
    n_eval [L] (valid steps). Layers with no valid step get NaN."""
    H, L, E = y.shape
    emask = (np.arange(E)[None, :] < np.asarray(experts)[:, None]) & (gpu_map >= 0)  # [L, E]
    valid = ~np.isnan(y).any(-1)  # [H, L]
    use = valid[:, :, None] & emask[None]  # [H, L, E]
    err = np.where(use, f - np.nan_to_num(y), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = {
            "mae_pp": 100 * np.nanmean(np.abs(err), axis=(0, 2)),
            "rmse_pp": 100 * np.sqrt(np.nanmean(err**2, axis=(0, 2))),
        }
        pos = use & (np.nan_to_num(y) > 0)
        rel = np.where(pos, np.abs(err) / np.where(pos, y, 1.0), np.nan)
        out["mre"] = np.nanmean(rel, axis=(0, 2))
        fbar = np.nanmean(np.where(use, f, np.nan), axis=0)  # [L, E]
        ybar = np.nanmean(np.where(use, y, np.nan), axis=0)
        out["havg_mae_pp"] = 100 * np.nanmean(np.abs(fbar - ybar), axis=1)
    G = int(gpu_map.max()) + 1
    onehot = (gpu_map[:, :, None] == np.arange(G)[None, None, :]) & emask[:, :, None]  # [L, E, G]
    Fg = np.einsum("le,leg->lg", np.nan_to_num(fbar), onehot)
    Yg = np.einsum("le,leg->lg", np.nan_to_num(ybar), onehot)
    ymax = Yg.max(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["maxload_err"] = np.abs(Fg.max(1) - ymax) / ymax
    n_eval = valid.sum(0)
    for k in out:
        out[k] = np.where(n_eval > 0, out[k], np.nan)
    out["n_eval"] = n_eval
    return out
