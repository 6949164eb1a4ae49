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

import numpy as np

from moeload.trace.layout import contiguous_expert_to_rank

METRICS = ("mae_pp", "rmse_pp", "mre", "havg_mae_pp", "maxload_err")


def contiguous_map(experts: np.ndarray, E: int, num_gpus: int) -> np.ndarray:
    """[L, E] GPU of each expert under the frameworks' contiguous layout of E_l experts on num_gpus
    (`trace.layout.contiguous_expert_to_rank`); padding columns get -1."""
    L = len(experts)
    out = np.full((L, E), -1, dtype=np.int64)
    for li, el in enumerate(experts):
        out[li, :el] = contiguous_expert_to_rank(int(el), num_gpus)
    return out


def error_metrics(f: np.ndarray, y: np.ndarray, experts: np.ndarray, gpu_map: np.ndarray) -> dict[str, np.ndarray]:
    """f, y: [H, L, E]; experts: [L]; gpu_map: [L, E] (-1 = padding, left out). Returns metric -> [L], plus
    n_eval [L] (valid steps). Layers with no valid step get NaN."""
    H, L, E = y.shape
    emask = (np.arange(E)[None, :] < np.asarray(experts)[:, None]) & (gpu_map >= 0)  # [L, E]
    valid = ~np.isnan(y[:, :, 0])  # [H, L]; rows are all NaN (no tokens) or all numbers
    n_eval = valid.sum(0)  # [L]
    w = valid[:, :, None] & emask[None]  # [H, L, E] entries that count
    y0 = np.where(w, y, 0.0)
    f0 = np.where(w, f, 0.0)
    ad = np.abs(f0 - y0)
    n_ent = np.maximum(n_eval * emask.sum(1), 1)  # [L]
    pos = y0 > 0
    rel = np.divide(ad, y0, out=np.zeros_like(ad), where=pos)
    nv = np.maximum(n_eval, 1)[:, None]
    fbar, ybar = f0.sum(0) / nv, y0.sum(0) / nv  # [L, E]
    out = {
        "mae_pp": 100 * ad.sum((0, 2)) / n_ent,
        "rmse_pp": 100 * np.sqrt((ad * ad).sum((0, 2)) / n_ent),
        "mre": np.where(pos.any((0, 2)), rel.sum((0, 2)) / np.maximum(pos.sum((0, 2)), 1), np.nan),
        "havg_mae_pp": 100 * np.abs(fbar - ybar).sum(1) / np.maximum(emask.sum(1), 1),
    }
    G = int(gpu_map.max()) + 1
    onehot = (gpu_map[:, :, None] == np.arange(G)[None, None, :]) & emask[:, :, None]  # [L, E, G]
    Fg = np.einsum("le,leg->lg", fbar, onehot)
    Yg = np.einsum("le,leg->lg", ybar, onehot)
    ymax = Yg.max(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["maxload_err"] = np.abs(Fg.max(1) - ymax) / ymax
    for k in out:
        out[k] = np.where(n_eval > 0, out[k], np.nan)
    out["n_eval"] = n_eval
    return out
