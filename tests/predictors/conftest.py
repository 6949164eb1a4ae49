"""Small synthetic proportion histories for predictor tests."""

from __future__ import annotations

import numpy as np
import pytest


def drifting(T: int = 300, L: int = 2, E: int = 6, seed: int = 0) -> np.ndarray:
    """Proportions [T, L, E]: multinomial noise around slowly drifting softmax means."""
    rng = np.random.default_rng(seed)
    t = np.arange(T)[:, None, None] / T
    logits = rng.normal(0, 0.5, (1, L, E)) + rng.normal(0, 0.5, (1, L, E)) * t
    mean = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    counts = np.stack([[rng.multinomial(2000, mean[s, layer]) for layer in range(L)] for s in range(T)])
    return counts / counts.sum(axis=2, keepdims=True)


@pytest.fixture(scope="session")
def history() -> np.ndarray:
    return drifting()


@pytest.fixture(scope="session")
def make_drifting():
    """The `drifting(T, L, E, seed)` generator, for tests that need other sizes."""
    return drifting
