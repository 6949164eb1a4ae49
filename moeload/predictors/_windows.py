"""Window means at many origins through cumulative sums (private helper)."""

from __future__ import annotations

import numpy as np


def cumsum0(p: np.ndarray) -> np.ndarray:
    """Cumulative sum with a leading zero row. p: [T, ...] -> [T + 1, ...]."""
    c = np.zeros((p.shape[0] + 1,) + p.shape[1:])
    np.cumsum(p, axis=0, out=c[1:])
    return c


def window_mean(c: np.ndarray, end: np.ndarray | int, width: np.ndarray | int) -> np.ndarray:
    """Mean of rows (end - width, end] from cumsum c: [T + 1, ...], clipped at the start.

    end: [n] or scalar (exclusive end index = number of rows seen); width: scalar or broadcastable.
    Returns [n, ...] (or [...] for scalar end).
    """
    end = np.asarray(end)
    start = np.maximum(end - np.asarray(width), 0)
    n = np.maximum(end - start, 1)
    shape = n.shape + (1,) * (c.ndim - 1)
    return (c[end] - c[start]) / n.reshape(shape)
