"""Synthetic expert-load proportions for predictor benchmarks (private helper).

Each layer's mean proportions start near uniform, specialise during an early transient
(exponential approach with time constant `tau` steps) and then drift slowly: log-means follow a
smoothed random walk plus a few slow sinusoids. Each step draws Dirichlet batch noise around the
mean and then multinomial routing of `tokens * top_k` assignments.
"""

from __future__ import annotations

import numpy as np


def synthetic_proportions(steps: int = 12000, layers: int = 4, experts: int = 16, *, seed: int = 0,
                          tokens: int = 8192, top_k: int = 2, tau: float = 1500.0,
                          drift: float = 1.0, concentration: float = 3000.0) -> np.ndarray:
    """Proportions [steps, layers, experts]; rows sum to 1."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)[:, None, None]
    target = rng.normal(0.0, 0.8, size=(1, layers, experts))
    start = rng.normal(0.0, 0.05, size=(1, layers, experts))
    approach = 1.0 - np.exp(-t / tau)
    # slow drift: random walk smoothed over ~2000 steps, plus sinusoids with periods 5k-30k steps
    walk = np.cumsum(rng.normal(0.0, 1.0, size=(steps, layers, experts)), axis=0)
    kernel = np.ones(min(2000, steps)) / min(2000, steps)
    smooth = np.apply_along_axis(lambda x: np.convolve(x, kernel, mode="same"), 0, walk) / np.sqrt(steps)
    periods = rng.uniform(5000, 30000, size=(3, 1, layers, experts))
    phases = rng.uniform(0, 2 * np.pi, size=(3, 1, layers, experts))
    amps = rng.uniform(0.0, 0.25, size=(3, 1, layers, experts))
    sines = (amps * np.sin(2 * np.pi * t[None] / periods + phases)).sum(axis=0)
    logits = start + approach * target + drift * approach * (0.6 * smooth + sines)
    mean = np.exp(logits - logits.max(axis=2, keepdims=True))
    mean /= mean.sum(axis=2, keepdims=True)
    noisy = rng.gamma(np.maximum(mean * concentration, 1e-3))
    noisy /= noisy.sum(axis=2, keepdims=True)
    counts = np.empty_like(noisy)
    for s in range(steps):
        counts[s] = rng.multinomial(tokens * top_k, noisy[s])
    return counts / counts.sum(axis=2, keepdims=True)
