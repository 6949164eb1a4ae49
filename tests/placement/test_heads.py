"""Ada-KV head budgets and head placement across TP sizes."""

from __future__ import annotations

import numpy as np
import pytest

from moeload import placement
from moeload.errors import InputError


def causal_attention(concentration: np.ndarray, t: int = 32, seed: int = 0) -> np.ndarray:
    """[1, H, T, T] causal softmax attention; head h's logits scaled by concentration[h]."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(1, concentration.size, t, t)) * concentration[None, :, None, None]
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    return a / a.sum(-1, keepdims=True)


def retained_mass(attn: np.ndarray, budgets: np.ndarray, window: int) -> float:
    """Observation-window attention mass kept when each head keeps its top `budgets` keys."""
    scores = -np.sort(-attn[:, :, -window:, :].mean(2), axis=-1)
    keep = np.arange(scores.shape[-1]) < budgets[..., None]
    return float((scores * keep).sum())


def test_adakv_moves_budget_from_sink_heads_and_keeps_more_mass():
    attn = causal_attention(np.array([8.0, 4.0, 1.0, 0.1]))
    attn[0, 0] = 0.0
    attn[0, 0, :, 0] = 1.0  # head 0 attends only to the first token (an attention sink)
    budgets = placement.adakv_budgets(attn, budget=8, window=8, alpha=0.25)
    assert budgets.shape == (1, 4)
    assert budgets.sum() == 8 * 4
    assert budgets[0, 0] == 2  # the safeguard floor(0.25 * 8) already holds all its mass
    assert np.all(budgets[0, 1:] > 8)
    uniform = np.full((1, 4), 8)
    assert retained_mass(attn, budgets, 8) > retained_mass(attn, uniform, 8) + 0.1


def test_adakv_rejects_bad_sizes():
    with pytest.raises(InputError, match="budget=40"):
        placement.adakv_budgets(np.ones((1, 2, 32, 32)) / 32, budget=40)
    with pytest.raises(InputError, match=r"\[L, H, T, T\]"):
        placement.adakv_budgets(np.ones((2, 32, 32)), budget=4)


def test_head_table_orders_strategies():
    budgets = np.array([[60, 10, 12, 8, 30, 9, 11, 20], [5, 5, 40, 5, 5, 5, 50, 5]])
    table = placement.head_placement_table(budgets, (2, 4), exact_time_limit=5.0)
    for tp, rows in table.groupby("tp"):
        r = rows.set_index("strategy")["imbalance_mean"]
        assert r["best_effort"] <= r["standard"] + 1e-9
        assert r["fair_copying"] <= r["best_effort"] + 1e-9
        assert r["exact"] <= min(r["fair_copying"], r["balanced"]) + 1e-6
    with pytest.raises(InputError, match="3 does not divide"):
        placement.head_placement_table(budgets, (3,))
