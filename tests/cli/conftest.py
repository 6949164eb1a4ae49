"""A small trace with realistic counts: 3 layers x 8 experts, top-2, a transient then stable phase."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moeload.trace import Manifest, TraceWriter

STEPS = 160
LAYERS = ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate", "model.layers.2.mlp.gate"]
EXPERTS = 8
TOP_K = 2
TOKENS = 4096


def synthetic_counts(seed: int = 0) -> np.ndarray:
    """[S, L, E] int64: proportions wander for the first 60 steps and settle on a skewed target."""
    rng = np.random.default_rng(seed)
    L = len(LAYERS)
    target = rng.dirichlet(np.full(EXPERTS, 2.0), size=L)  # [L, E]
    walk = rng.normal(0, 0.35, size=(60, L, EXPERTS)).cumsum(0)
    decay = ((1 - np.arange(60) / 60) ** 2)[:, None, None]
    logits = np.log(target)[None] + decay * walk  # early routing wanders, then settles on target
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    out = np.zeros((STEPS, L, EXPERTS), dtype=np.int64)
    for s in range(STEPS):
        probs = p[s] if s < 60 else target
        for li in range(L):
            out[s, li] = rng.multinomial(TOKENS * TOP_K, probs[li])
    return out


def write_trace(path: Path, counts: np.ndarray, steps: np.ndarray | None = None, *, ep_size: int = 2) -> Path:
    m = Manifest(layers=LAYERS, experts_per_layer=EXPERTS, top_k=TOP_K, framework="synthetic",
                 tokens_per_step=TOKENS, world_size=ep_size, ep_size=ep_size)
    steps = np.arange(len(counts)) if steps is None else steps
    with TraceWriter(path, m) as w:
        half = len(counts) // 2
        w.write_block(steps[:half], counts[:half])
        w.write_block(steps[half:], counts[half:])
    return path


@pytest.fixture(scope="session")
def counts() -> np.ndarray:
    return synthetic_counts()


@pytest.fixture(scope="session")
def trace_dir(tmp_path_factory, counts) -> Path:
    return write_trace(tmp_path_factory.mktemp("cli") / "run.moeload", counts)
