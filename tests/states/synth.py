"""Synthetic routing counts with known transient/stable phases (shared by the states tests)."""

from __future__ import annotations

import numpy as np


def routing_counts(S: int, L: int = 2, E: int = 8, n: int = 4096, transient=((0, 1000),), drift: float = 0.08,
                   seed: int = 0, bridge: bool = False) -> np.ndarray:
    """[S, L, E] int64 multinomial counts of n assignments per step. The router logits do a random
    walk (step sd `drift`) inside the `transient` (start, stop) intervals and stay fixed elsewhere,
    so outside them the proportions are pure multinomial noise around a fixed mean. bridge: the
    second half of each interval retraces the first, so the run ends where it started."""
    rng = np.random.default_rng(seed)
    moving = np.zeros(S, dtype=bool)
    for a, b in transient:
        moving[a:b] = True
    steps = np.where(moving[:, None, None], drift * rng.standard_normal((S, L, E)), 0.0)
    if bridge:
        for a, b in transient:
            h = (b - a) // 2
            steps[a + h : a + 2 * h] = -steps[a : a + h][::-1]
    logits = rng.standard_normal((L, E)) + np.cumsum(steps, axis=0)
    q = np.exp(logits - logits.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    return rng.multinomial(n, q)


def proportions(c: np.ndarray) -> np.ndarray:
    return c / c.sum(-1, keepdims=True)
