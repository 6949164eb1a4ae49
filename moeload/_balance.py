"""Load-balance statistics of a load vector: the one home of max / mean, min / max, cv and hottest share.

Used by `placement` (GPU imbalance of a plan), `tracing.callbacks.metrics` (TensorBoard / W&B
metrics of each flushed block) and the CLI's `summary`. It lives beside `errors.py`, below every
package, because the recording layer (`tracing`) and the analysis layer (`placement`) both need
it and neither may import the other; it imports nothing of moeload.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def max_over_mean(load: Any, idle: float = float("nan")) -> np.ndarray:
    """Max / mean over the last axis of `load: [..., N]` (non-negative) -> `[...]` float64.

    1 = perfectly balanced, N = everything on one. `idle` is the value where the mean is 0 (no load).
    """
    x = np.asarray(load, dtype=np.float64)
    mean = x.mean(axis=-1)
    busy = mean > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(busy, x.max(axis=-1) / np.where(busy, mean, 1.0), idle)


def balance_stats(load: Any) -> dict[str, np.ndarray]:
    """Balance of `load: [..., N]` (non-negative) over its last axis -> name -> `[...]` float64.

    max_over_mean (1 = balanced), min_over_max (1 = balanced, 0 = an idle member), cv (population
    std / mean) and hottest_share (max / sum); each NaN where the load sums to 0.
    """
    x = np.asarray(load, dtype=np.float64)
    total = x.sum(axis=-1)
    busy = total > 0
    mean, top = x.mean(axis=-1), x.max(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "max_over_mean": np.where(busy, top / np.where(busy, mean, 1.0), np.nan),
            "min_over_max": np.where(busy, x.min(axis=-1) / np.where(busy, top, 1.0), np.nan),
            "cv": np.where(busy, x.std(axis=-1) / np.where(busy, mean, 1.0), np.nan),
            "hottest_share": np.where(busy, top / np.where(busy, total, 1.0), np.nan),
        }


__all__ = ["balance_stats", "max_over_mean"]
