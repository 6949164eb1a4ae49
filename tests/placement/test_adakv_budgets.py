"""Ada-KV budget rule (arXiv 2407.11550): hand-computed answers, exact conservation, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeload.errors import InputError
from moeload.placement import adakv_budgets


def last_row(*scores: list[float]) -> np.ndarray:
    """[1, H, T, T] attention whose last query row of head h is scores[h] (window=1 reads only it)."""
    s = np.asarray(scores, dtype=np.float64)
    attn = np.zeros((1, s.shape[0], s.shape[1], s.shape[1]))
    attn[0, :, -1, :] = s
    return attn


CONCENTRATED = [0.7, 0.1, 0.1, 0.1]
FLAT = [0.25, 0.25, 0.25, 0.25]


@pytest.mark.parametrize(("alpha", "expected"), [
    (0.0, [1, 3]),   # no floor: top-4 of {0.7, 0.1 x3} + {0.25 x4} = 0.7 and three 0.25s
    (0.5, [1, 3]),   # floor 0.5 * 4 / 2 = 1 each (0.7 and a 0.25); the 2 left: both 0.25s
    (1.0, [2, 2]),   # floor 2 each: the whole budget is the safeguard, uniform
])
def test_concentrated_head_gets_fewer_keys_than_flat_head(alpha, expected):
    budgets = adakv_budgets(last_row(CONCENTRATED, FLAT), budget=2, window=1, alpha=alpha)
    np.testing.assert_array_equal(budgets, [expected])
    assert budgets.dtype == np.int64 and budgets.sum() == 4


def test_window_averages_the_last_queries():
    attn = np.zeros((1, 2, 4, 4))
    attn[0, 0, -2:, 0] = 1.0  # head 0: both window queries look at key 0 only
    attn[0, 1, -2, :2] = 0.5  # head 1: the two window queries look at different key pairs
    attn[0, 1, -1, 2:] = 0.5  # -> mean 0.25 on every key
    np.testing.assert_array_equal(adakv_budgets(attn, budget=2, window=2, alpha=0.0), [[1, 3]])
    # window=1 sees only the last row: head 0 [1, 0, 0, 0], head 1 [0.5, 0.5, 0, 0] once sorted.
    # B = 4: 1.0, 0.5, 0.5, then a zero: head 0's (rank 1 in its head) before head 1's (rank 2)
    np.testing.assert_array_equal(adakv_budgets(attn, budget=2, window=1, alpha=0.0), [[2, 2]])
    np.testing.assert_array_equal(adakv_budgets(attn, budget=1, window=1, alpha=0.0), [[1, 1]])


def test_ties_split_identical_heads_evenly():
    # total 3 over two identical flat heads: key rank 0 of head 0, of head 1, then rank 1 of head 0
    np.testing.assert_array_equal(adakv_budgets(last_row(FLAT, FLAT), total=3, window=1, alpha=0.0), [[2, 1]])
    np.testing.assert_array_equal(adakv_budgets(last_row(FLAT, FLAT, FLAT), total=7, window=1, alpha=0.0),
                                  [[3, 2, 2]])


def test_total_smaller_than_heads_leaves_heads_empty():
    attn = last_row([0.9, 0.05, 0.03, 0.02], [0.5, 0.5, 0.0, 0.0], FLAT, [0.6, 0.4, 0.0, 0.0])
    # floor(0.2 * 2 / 4) = 0: the two highest scores overall are 0.9 (head 0) and 0.6 (head 3)
    np.testing.assert_array_equal(adakv_budgets(attn, total=2, window=1), [[1, 0, 0, 1]])
    np.testing.assert_array_equal(adakv_budgets(attn, total=1, window=1), [[1, 0, 0, 0]])


def test_total_of_every_key_keeps_everything():
    attn = last_row(CONCENTRATED, FLAT, [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(adakv_budgets(attn, total=12, window=1), [[4, 4, 4]])


def test_safeguard_floor_is_exact_decimal():
    # alpha 0.57 of B = 100 over 3 heads: floor(57 / 3) = 19 (0.57 * 100 is 56.99... in binary floats,
    # which would give 18). Head 0 has one useful key, so it keeps only the floor; the 43 left
    # alternate between the identical flat heads 1 and 2 (22 and 21).
    t = 64
    peaked = [1.0] + [0.0] * (t - 1)
    flat = [1.0 / t] * t
    np.testing.assert_array_equal(adakv_budgets(last_row(peaked, flat, flat), total=100, window=1, alpha=0.57),
                                  [[19, 41, 40]])


def test_layers_are_independent():
    attn = np.concatenate([last_row(CONCENTRATED, FLAT), last_row(FLAT, CONCENTRATED)])
    np.testing.assert_array_equal(adakv_budgets(attn, budget=2, window=1, alpha=0.0), [[1, 3], [3, 1]])


@settings(max_examples=60, deadline=None)
@given(
    heads=st.integers(1, 6), t=st.integers(1, 12), seed=st.integers(0, 2**31 - 1),
    frac=st.floats(0.0, 1.0), alpha=st.sampled_from([0.0, 0.2, 0.25, 0.5, 0.57, 1.0]),
    ties=st.booleans(),
)
def test_budget_is_conserved_exactly(heads, t, seed, frac, alpha, ties):
    rng = np.random.default_rng(seed)
    attn = rng.dirichlet(np.ones(t), size=(2, heads, t))  # [2, H, T, T]
    if ties:
        attn = np.round(attn, 1)
    total = max(1, round(frac * heads * t))
    budgets = adakv_budgets(attn, total=total, window=rng.integers(1, t + 1), alpha=alpha)
    assert budgets.dtype == np.int64
    np.testing.assert_array_equal(budgets.sum(axis=1), [total, total])
    assert budgets.min() >= 0 and budgets.max() <= t
    assert budgets.min() >= int(alpha * total + 1e-9) // heads  # every head keeps its safeguard


def test_budget_per_head_is_total_of_budget_times_heads():
    rng = np.random.default_rng(3)
    attn = rng.dirichlet(np.ones(16), size=(3, 4, 16))
    np.testing.assert_array_equal(adakv_budgets(attn, budget=5), adakv_budgets(attn, total=20))


def test_rejects_bad_arguments():
    attn = last_row(FLAT, FLAT)
    with pytest.raises(InputError, match="exactly one of budget"):
        adakv_budgets(attn)
    with pytest.raises(InputError, match="exactly one of budget"):
        adakv_budgets(attn, 2, total=4)
    with pytest.raises(InputError, match="total=9"):
        adakv_budgets(attn, total=9)
    with pytest.raises(InputError, match="total=0"):
        adakv_budgets(attn, total=0)
    with pytest.raises(InputError, match="window=5"):
        adakv_budgets(attn, budget=2, window=5)
    with pytest.raises(InputError, match="alpha=1.5"):
        adakv_budgets(attn, budget=2, window=1, alpha=1.5)
