"""Attention heads as placement units (FairKV): Ada-KV per-head KV budgets, heads onto TP ranks.

With a compressed KV cache each head keeps its own number of keys, so the decode attention work of
a head is proportional to its budget and tensor-parallel ranks holding contiguous heads become
unbalanced. `adakv_budgets` derives per-head budgets from attention weights with Ada-KV's adaptive
allocation; `head_placement_table` compares standard TP, FairKV best-effort and Fair-Copying.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from moeload.errors import InputError
from moeload.placement._registry import plan


def adakv_budgets(attn: np.ndarray, budget: int, *, window: int = 16, alpha: float = 0.2) -> np.ndarray:
    """Ada-KV budgets of each head from attention weights `attn: [L, H, T, T]` (rows = queries).

    Each head scores key j by its mean attention from the last `window` queries (the observation
    window of SnapKV / Ada-KV). Per layer the total budget is B = budget * H: every head first gets
    the safeguard floor(alpha * budget), and the remaining keys go to the highest scores across all
    heads of the layer (Ada-KV's adaptive top-B selection), so heads whose attention is
    concentrated on few keys receive small budgets and diffuse heads large ones. Budgets are capped
    at T. Returns `budgets: [L, H]` int64 (number of keys each head keeps).
    """
    a = np.asarray(attn, dtype=np.float64)
    if a.ndim != 4 or a.shape[2] != a.shape[3]:
        raise InputError(f"attn: expected shape [L, H, T, T], got {a.shape}")
    num_layers, num_heads, t, _ = a.shape
    if not 1 <= budget <= t:
        raise InputError(f"budget={budget}: expected 1 <= budget <= T={t}")
    if not 1 <= window <= t:
        raise InputError(f"window={window}: expected 1 <= window <= T={t}")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha={alpha}: expected a fraction in [0, 1]")
    scores = a[:, :, t - window :, :].mean(axis=2)  # [L, H, T]
    floor = int(alpha * budget)
    out = np.empty((num_layers, num_heads), dtype=np.int64)
    for layer in range(num_layers):
        rest = budget * num_heads - floor * num_heads
        # Keys of the same head beyond the safeguard compete across heads; the floor keys are the
        # head's own top keys, so they are excluded from the competition.
        ranked = -np.sort(-scores[layer], axis=1)[:, floor:]  # [H, T - floor]
        flat = ranked.reshape(-1)
        chosen = np.argsort(-flat, kind="stable")[:rest]
        out[layer] = floor + np.bincount(chosen // ranked.shape[1], minlength=num_heads)
    return np.minimum(out, t)


def head_placement_table(
    budgets: np.ndarray,
    tp_sizes: tuple[int, ...] = (2, 4, 8),
    *,
    extra_per_gpu: int = 1,
    exact_time_limit: float | None = 5.0,
) -> pd.DataFrame:
    """Max / mean rank load of heads with loads `budgets: [L, H]` for each TP size.

    Strategies: `standard` (contiguous heads, H / TP per rank), `best_effort` (FairKV: heads
    re-assigned LPT-style, still H / TP per rank), `fair_copying` (FairKV: plus `extra_per_gpu`
    copies per rank with an uneven split), `exact` (MILP optimum of that copying budget, chosen
    split, at most `exact_time_limit` s per layer; None leaves it out), `balanced` (moeload's own).
    One row per TP size and strategy: mean and max over layers.
    """
    b = np.asarray(budgets, dtype=np.float64)
    num_heads = b.shape[-1]
    rows = []
    for tp in tp_sizes:
        if num_heads % tp:
            raise InputError(f"tp_sizes: {tp} does not divide the number of heads {num_heads}")
        copies = num_heads + extra_per_gpu * tp
        strategies: list[tuple[str, str, int, dict[str, Any]]] = [  # (name, policy, slots, options)
            ("standard", "contiguous", num_heads, {}),
            ("best_effort", "fair_copying", num_heads, {}),
            ("fair_copying", "fair_copying", copies, {}),
            ("balanced", "balanced", copies, {}),
        ]
        if exact_time_limit is not None:
            strategies.append(("exact", "exact", copies, {"time_limit": exact_time_limit}))
        for name, policy, slots, opts in strategies:
            pl = plan(b, tp, slots, policy, **opts)
            rows.append({"tp": tp, "strategy": name, "slots": slots,
                         "imbalance_mean": float(pl.imbalance.mean()), "imbalance_max": float(pl.imbalance.max())})
    return pd.DataFrame(rows)
