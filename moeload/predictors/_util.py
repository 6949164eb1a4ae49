"""Small shared helpers for predictor families (private)."""

from __future__ import annotations

import numpy as np

from moeload.errors import InputError


def check_int(name: str, value: object, low: int = 1) -> int:
    """value as an int >= low, else InputError naming the hyperparameter."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InputError(f"{name}: expected an integer >= {low}, got {value!r}")
    return int(value)


def check_float(name: str, value: object, low: float, high: float) -> float:
    """value as a float in [low, high], else InputError naming the hyperparameter."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected a number, got {value!r}") from None
    if not (low <= v <= high):
        raise InputError(f"{name}: expected a value in [{low}, {high}], got {value!r}")
    return v


def ema_last(p: np.ndarray, alpha: np.ndarray | float, level: np.ndarray | None = None) -> np.ndarray:
    """EMA level after the last row of p: [T, ...]; alpha: scalar or [...]; level: start [...] or p[0]."""
    a = np.broadcast_to(np.asarray(alpha, dtype=np.float64), p.shape[1:])
    if level is None:
        level, p = p[0].astype(np.float64), p[1:]
    for lo in range(0, p.shape[0], 256):
        block = p[lo : lo + 256]
        n = block.shape[0]
        k = np.arange(n - 1, -1, -1).reshape((n,) + (1,) * a.ndim)
        level = (1.0 - a) ** n * level + (a * (1.0 - a) ** k * block).sum(axis=0)
    return level
