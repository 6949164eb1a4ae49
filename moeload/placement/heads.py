"""Attention heads as placement units (FairKV): Ada-KV per-head KV budgets, heads onto TP ranks.

With a compressed KV cache each head keeps its own number of keys, so the decode attention work of
a head is proportional to its budget and tensor-parallel ranks holding contiguous heads become
unbalanced. `adakv_budgets` derives per-head budgets from attention weights with Ada-KV's adaptive
allocation; `head_placement_table` compares standard TP, FairKV best-effort and Fair-Copying;
`split_requests` turns a plan's fractional shares into whole decode requests per head copy and
`rank_work` gives each rank's resulting work.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any

import numpy as np
import pandas as pd

from moeload.errors import InputError
from moeload.placement._placement import Placement, gpu_loads
from moeload.placement._registry import plan


def adakv_budgets(
    attn: np.ndarray,
    budget: int | None = None,
    *,
    total: int | None = None,
    window: int = 16,
    alpha: float = 0.2,
) -> np.ndarray:
    """Ada-KV budgets of each head from attention weights `attn: [L, H, T, T]` (rows = queries).

    The rule is Ada-KV's adaptive budget allocation (Feng et al., "Ada-KV: Optimizing KV Cache
    Eviction by Adaptive Budget Allocation for Efficient LLM Inference", arXiv 2407.11550), the
    allocation FairKV (arXiv 2502.15804) balances:

    1. Scores: head h scores key j by its mean attention from the last `window` queries (the
       observation window of SnapKV / Ada-KV; no pooling).
    2. Total: each layer keeps B = `total` keys over all its heads (default `budget * H`, i.e.
       `budget` keys per head on average).
    3. Safeguard: every head first keeps its own top floor(alpha * B / H) keys (Ada-KV's code calls
       alpha `floor_alpha`, 0.2 in its scripts); alpha is read as the decimal it prints as, so the
       floor is exact (0.57 * 100 is 57, not 56.99...).
    4. Adaptive part: the remaining B - H * floor keys go to the highest scores left across all
       heads of the layer (one top-k over the concatenated scores); a head's budget is its floor
       plus its keys in that top-k. Heads whose attention is concentrated on few keys get small
       budgets, diffuse heads large ones. Among equal scores the key ranked higher in its own head
       goes first, then the lower head index, so identical heads split evenly (within one key).

    Guarantees: integer budgets, each row sums to exactly B, 0 <= budget <= T (a head cannot keep
    more keys than exist). With B < H (and then a zero floor) some heads keep nothing.
    Returns `budgets: [L, H]` int64 (number of keys each head keeps).
    """
    a = np.asarray(attn, dtype=np.float64)
    if a.ndim != 4 or a.shape[2] != a.shape[3]:
        raise InputError(f"attn: expected shape [L, H, T, T], got {a.shape}")
    t = a.shape[2]
    layer_total(budget, total, a.shape[1], t)
    if not 1 <= window <= t:
        raise InputError(f"window={window}: expected 1 <= window <= T={t}")
    return adakv_allocate(a[:, :, t - window :, :].mean(axis=2), budget, total=total, alpha=alpha)


def layer_total(budget: int | None, total: int | None, num_heads: int, t: int) -> int:
    """Keys B one layer keeps: `budget` per head or `total`; exactly one given, 1 <= B <= H * T."""
    if (budget is None) == (total is None):
        raise InputError(
            f"adakv_budgets: give exactly one of budget= (per head) or total= (per layer), "
            f"got budget={budget}, total={total}"
        )
    if budget is not None and not 1 <= budget <= t:
        raise InputError(f"budget={budget}: expected 1 <= budget <= T={t}")
    b = budget * num_heads if budget is not None else int(total)  # type: ignore[arg-type]
    if not 1 <= b <= num_heads * t:
        raise InputError(f"total={total}: expected 1 <= total <= H * T = {num_heads * t}")
    return b


def adakv_allocate(
    scores: np.ndarray,
    budget: int | None = None,
    *,
    total: int | None = None,
    alpha: float = 0.2,
) -> np.ndarray:
    """Steps 2-4 of `adakv_budgets` on key scores `scores: [L, H, T]` (e.g. the observation window's
    mean attention, computed without the T x T matrix at long context). Same guarantees; returns
    `budgets: [L, H]` int64."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 3:
        raise InputError(f"scores: expected shape [L, H, T], got {scores.shape}")
    num_layers, num_heads, t = scores.shape
    b = layer_total(budget, total, num_heads, t)
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha={alpha}: expected a fraction in [0, 1]")
    if not np.all(np.isfinite(scores)):
        raise InputError("scores: expected finite values")
    floor = int(Fraction(repr(float(alpha))) * b // num_heads)
    rest = b - floor * num_heads
    out = np.empty((num_layers, num_heads), dtype=np.int64)
    for layer in range(num_layers):
        # The floor keys are each head's own top keys, so only the keys after them compete.
        ranked = -np.sort(-scores[layer], axis=1)[:, floor:]  # [H, T - floor]
        head, pos = np.divmod(np.arange(ranked.size), ranked.shape[1])
        chosen = np.lexsort((head, pos, -ranked.reshape(-1)))[:rest]  # score, then rank in head, then head
        out[layer] = floor + np.bincount(head[chosen], minlength=num_heads)
    return out


def split_requests(placement: Placement, requests: int | np.ndarray) -> np.ndarray:
    """Whole decode requests served by each slot: `[L, R]` int64.

    requests: decode requests of each head, an int (every head), `[E]` or `[L, E]` non-negative ints.
    A head's requests are divided among its copies in proportion to `placement.share` by largest
    remainders (Hamilton's method; equal remainders go to the lower slot), so the counts of one
    head's slots add up exactly to its requests: no request is lost or served twice. Shares are
    rounded to 9 decimals first, so float noise in a share does not decide a remainder.
    """
    num_layers, num_units = placement.num_layers, placement.num_experts
    req = np.broadcast_to(np.asarray(requests), (num_layers, num_units))
    if not np.issubdtype(req.dtype, np.integer) or np.any(req < 0):
        raise InputError(f"requests: expected non-negative integers per head, got {np.asarray(requests)!r}")
    out = np.zeros((num_layers, placement.num_replicas), dtype=np.int64)
    for layer in range(num_layers):
        phy2log = placement.phy2log[layer]
        exact = np.round(req[layer, phy2log] * placement.share[layer], 9)  # [R]
        out[layer] = np.floor(exact).astype(np.int64)
        for unit in range(num_units):
            slots = np.flatnonzero(phy2log == unit)
            missing = int(req[layer, unit] - out[layer, slots].sum())
            order = np.argsort(-(exact[slots] - out[layer, slots]), kind="stable")
            out[layer, slots[order[:missing]]] += 1
    return out


def rank_work(placement: Placement, lengths: np.ndarray, per_slot: np.ndarray) -> np.ndarray:
    """Decode attention work of each rank: `[L, G]`, sum over its slots of requests x KV length.

    lengths: `[L, E]` KV length (budget) of each head; per_slot: `[L, R]` requests each slot serves
    (`split_requests`). Equals the simulator's `placement.evaluate(lengths * requests).gpu_load`
    wherever the shares divide the requests exactly; otherwise it differs by the rounding of whole
    requests, less than one request's KV per copy of each head.
    """
    ln = np.asarray(lengths, dtype=np.float64)
    if ln.shape != (placement.num_layers, placement.num_experts):
        raise InputError(f"lengths: expected shape {(placement.num_layers, placement.num_experts)}, got {ln.shape}")
    if np.shape(per_slot) != placement.phy2log.shape:
        raise InputError(f"per_slot: expected shape {placement.phy2log.shape}, got {np.shape(per_slot)}")
    per_slot_work = np.take_along_axis(ln, placement.phy2log, axis=1) * per_slot
    return gpu_loads(per_slot_work, placement.num_gpus)


def head_plans(
    budgets: np.ndarray,
    tp: int,
    *,
    extra_per_gpu: int = 1,
    exact_time_limit: float | None = 5.0,
) -> dict[str, Placement]:
    """Plans of heads with loads `budgets: [L, H]` on `tp` ranks, by strategy name.

    `standard` (contiguous heads, H / TP per rank), `best_effort` (FairKV: heads re-assigned
    LPT-style, still H / TP per rank), `fair_copying` (FairKV: plus `extra_per_gpu` copies per rank
    with an uneven split), `balanced` (moeload's own, same slots), `exact` (MILP optimum of that
    copying budget, chosen split, at most `exact_time_limit` s per layer; None leaves it out).
    """
    b = np.asarray(budgets, dtype=np.float64)
    num_heads = b.shape[-1]
    if num_heads % tp:
        raise InputError(f"tp: {tp} does not divide the number of heads {num_heads}")
    copies = num_heads + extra_per_gpu * tp
    strategies: list[tuple[str, str, int, dict[str, Any]]] = [  # (name, policy, slots, options)
        ("standard", "contiguous", num_heads, {}),
        ("best_effort", "fair_copying", num_heads, {}),
        ("fair_copying", "fair_copying", copies, {}),
        ("balanced", "balanced", copies, {}),
    ]
    if exact_time_limit is not None:
        strategies.append(("exact", "exact", copies, {"time_limit": exact_time_limit}))
    return {name: plan(b, tp, slots, policy, **opts) for name, policy, slots, opts in strategies}


def head_placement_table(
    budgets: np.ndarray,
    tp_sizes: tuple[int, ...] = (2, 4, 8),
    *,
    extra_per_gpu: int = 1,
    exact_time_limit: float | None = 5.0,
) -> pd.DataFrame:
    """Max / mean rank load of heads with loads `budgets: [L, H]` for each TP size.

    Strategies as in `head_plans`. One row per TP size and strategy: mean and max over layers.
    """
    rows = []
    for tp in tp_sizes:
        plans = head_plans(budgets, tp, extra_per_gpu=extra_per_gpu, exact_time_limit=exact_time_limit)
        for name, pl in plans.items():
            rows.append(
                {
                    "tp": tp,
                    "strategy": name,
                    "slots": pl.num_replicas,
                    "imbalance_mean": float(pl.imbalance.mean()),
                    "imbalance_max": float(pl.imbalance.max()),
                }
            )
    return pd.DataFrame(rows)


@dataclasses.dataclass(frozen=True)
class DecodeCost:
    """Time of one TP rank's decode attention in one layer: `fixed_s + per_slot_s * slots + bytes / bandwidth`.

    `slots` counts the head copies on the rank that serve at least one request (one attention call
    each); bytes are the keys and values it reads, `work * 2 * head_dim * dtype_bytes` (work =
    requests x keys, `rank_work`). The simulator of `Placement.imbalance` is this model with
    `fixed_s = per_slot_s = 0`: time proportional to KV. Default constants: one H200, bf16, head
    dim 128, one SDPA call (enable_gqa) per head copy, fit by least squares on the per-rank times of
    two `benchmarks/fairkv_decode.py` runs (skew 0.5 and 1.0, TP 2/4/8, 64 requests x 8,192 keys;
    docs/placement.md, "Fair-Copying measured"); on four other runs it predicted the measured
    speedups within 0.11 and their ranking. Refit for another GPU or kernel with `DecodeCost.fit`.
    """

    fixed_s: float = 10.0e-6
    per_slot_s: float = 11.3e-6
    bandwidth: float = 4.6e12  # bytes per second
    head_dim: int = 128
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        if not (self.fixed_s >= 0 and self.per_slot_s >= 0 and self.bandwidth > 0):
            raise InputError(f"DecodeCost: expected fixed_s >= 0, per_slot_s >= 0, bandwidth > 0, got {self}")
        if self.head_dim < 1 or self.dtype_bytes < 1:
            raise InputError(f"DecodeCost: expected head_dim >= 1 and dtype_bytes >= 1, got {self}")

    @property
    def bytes_per_key(self) -> int:
        return 2 * self.head_dim * self.dtype_bytes  # a key and a value

    def rank_seconds(self, work: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Seconds per (layer, rank): work, slots: `[L, G]` (requests x keys; calls)."""
        w, s = np.asarray(work, dtype=np.float64), np.asarray(slots, dtype=np.float64)
        busy = (w > 0) | (s > 0)
        return np.where(busy, self.fixed_s + self.per_slot_s * s + w * self.bytes_per_key / self.bandwidth, 0.0)

    def step_seconds(self, placement: Placement, lengths: np.ndarray, per_slot: np.ndarray) -> float:
        """Decode attention time of one step: over layers, the slowest rank (ranks meet at each
        layer's all-reduce). lengths: `[L, E]` keys per head; per_slot: `[L, R]` (`split_requests`)."""
        work = rank_work(placement, lengths, per_slot)
        return float(self.rank_seconds(work, rank_slots(placement, per_slot)).max(axis=1).sum())

    @classmethod
    def fit(
        cls, work: np.ndarray, slots: np.ndarray, seconds: np.ndarray, *, head_dim: int = 128, dtype_bytes: int = 2
    ) -> DecodeCost:
        """Least-squares constants from measured per-rank times: work, slots, seconds of equal shape.

        Coefficients that come out negative (noise on a term the data cannot resolve) are clipped to 0.
        """
        w, s, t = (np.ravel(np.asarray(x, dtype=np.float64)) for x in (work, slots, seconds))
        if not (w.shape == s.shape == t.shape) or w.size < 3:
            raise InputError(
                f"DecodeCost.fit: expected >= 3 measurements of equal shape, got {w.size}, {s.size}, {t.size}"
            )
        a = np.stack([np.ones_like(w), s, w], axis=1)
        (fixed, per_slot, per_key), *_ = np.linalg.lstsq(a, t, rcond=None)
        if per_key <= 0:
            raise InputError("DecodeCost.fit: time does not grow with work in these measurements; no bandwidth to fit")
        bytes_per_key = 2 * head_dim * dtype_bytes
        return cls(
            max(float(fixed), 0.0), max(float(per_slot), 0.0), bytes_per_key / float(per_key), head_dim, dtype_bytes
        )


def rank_slots(placement: Placement, per_slot: np.ndarray) -> np.ndarray:
    """Head copies on each rank that serve at least one request: `[L, G]` int64 (one call each)."""
    busy = (np.asarray(per_slot) > 0).astype(np.int64)
    if busy.shape != placement.phy2log.shape:
        raise InputError(f"per_slot: expected shape {placement.phy2log.shape}, got {busy.shape}")
    return gpu_loads(busy, placement.num_gpus).astype(np.int64)


def head_decode_table(
    budgets: np.ndarray,
    requests: int,
    tp_sizes: tuple[int, ...] = (2, 4, 8),
    *,
    cost: DecodeCost | None = None,
    extra_per_gpu: int = 1,
    exact_time_limit: float | None = 5.0,
) -> pd.DataFrame:
    """Where Fair-Copying pays: predicted decode attention time of each head plan.

    budgets: `[L, H]` keys each KV head keeps (Ada-KV budgets); every head serves `requests`
    decode requests of that length. One row per TP size and strategy (`head_plans`): `sim_speedup`
    (over standard TP, time proportional to KV: the simulator), `step_ms` and `speedup` under `cost`
    (default `DecodeCost()`, one H200), and `best` (the fastest strategy of its TP size under
    `cost`). Copies cost a call each and split whole requests (`split_requests`), so with little KV
    per rank the extra calls can cost more than the imbalance they remove.
    """
    cost = DecodeCost() if cost is None else cost
    b = np.asarray(budgets, dtype=np.float64)
    if b.ndim == 1:
        b = b[None]
    if b.ndim != 2 or np.any(b < 0) or not np.all(np.isfinite(b)):
        raise InputError(f"budgets: expected finite non-negative [L, H], got shape {np.shape(budgets)}")
    if isinstance(requests, bool) or not isinstance(requests, (int, np.integer)) or requests < 1:
        raise InputError(f"requests: expected a positive integer, got {requests!r}")
    rows = []
    for tp in tp_sizes:
        plans = head_plans(b * requests, tp, extra_per_gpu=extra_per_gpu, exact_time_limit=exact_time_limit)
        for name, pl in plans.items():
            per_slot = split_requests(pl, int(requests))
            rows.append(
                {
                    "tp": tp,
                    "strategy": name,
                    "slots": pl.num_replicas,
                    "sim_step": float(pl.gpu_load.max(axis=1).sum()),
                    "step_ms": 1e3 * cost.step_seconds(pl, b, per_slot),
                }
            )
    df = pd.DataFrame(rows)
    base = df[df.strategy == "standard"].set_index("tp")
    df["sim_speedup"] = df.tp.map(base.sim_step) / df.sim_step
    df["speedup"] = df.tp.map(base.step_ms) / df.step_ms
    df["best"] = df.step_ms == df.groupby("tp").step_ms.transform("min")
    return df.drop(columns="sim_step")
