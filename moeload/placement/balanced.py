"""moeload's own policy: EPLB replication and packing, swap refinement, then the best split.

Per layer it builds two candidates and keeps the better one under the chosen split:
1. EPLB's global plan, refined by pairwise slot swaps between the busiest GPU and any other GPU
   while that lowers the larger of the two loads (even split), then re-split optimally (LP);
2. the Fair-Copying plan (best-effort assignment, copies of the busiest GPU's heaviest unit, LP
   split).
then improves the better one by local search under the optimal split: copy a unit of the busiest
GPU into a slot whose unit has another copy, or swap a slot of the busiest GPU with any other slot,
taking the first move that lowers the LP optimum, for at most `search` LP evaluations per layer.
The final split is the optimal one closest to even (`optimal_split(..., even_tiebreak=True)`).
With `split="even"` only candidate 1 is used, without the LP re-split or the search.
"""

from __future__ import annotations

import numpy as np

from moeload.errors import InputError
from moeload.placement._placement import Placement, even_share, imbalance_of
from moeload.placement._split import optimal_split, split_loads
from moeload.placement.eplb import plan_eplb
from moeload.placement.fair_copying import plan_fair_copying


def swap_refine(phy2log: np.ndarray, per_slot: np.ndarray, num_gpus: int, max_rounds: int = 1000) -> np.ndarray:
    """Swap slots between the busiest GPU and another GPU while that lowers their larger load.

    phy2log, per_slot: [R] unit and load of each slot. Returns the refined `phy2log: [R]`.
    Each swap lowers the sorted GPU-load vector lexicographically, so the loop ends.
    """
    phy2log, per_slot = phy2log.copy(), per_slot.copy()
    slots = phy2log.shape[0] // num_gpus
    for _ in range(max_rounds):
        load = per_slot.reshape(num_gpus, slots).sum(1)
        top = int(np.argmax(load))
        mine = per_slot[top * slots : (top + 1) * slots]
        best, move = load[top] * (1 - 1e-12), None
        for g in range(num_gpus):
            if g == top:
                continue
            theirs = per_slot[g * slots : (g + 1) * slots]
            delta = mine[:, None] - theirs[None, :]  # [S, S] load moved from top to g
            pair_max = np.maximum(load[top] - delta, load[g] + delta)
            i, j = np.unravel_index(np.argmin(pair_max), pair_max.shape)
            if pair_max[i, j] < best:
                best, move = pair_max[i, j], (top * slots + i, g * slots + j)
        if move is None:
            break
        a, b = move
        phy2log[[a, b]] = phy2log[[b, a]]
        per_slot[[a, b]] = per_slot[[b, a]]
    return phy2log


def split_search(
    phy2log: np.ndarray, w: np.ndarray, num_gpus: int, max_evals: int
) -> tuple[np.ndarray, np.ndarray]:
    """Local search over one layer's copy layout `phy2log: [R]` for loads `w: [E]`, optimal split.

    Returns the improved `phy2log: [R]` and its `share: [R]`.
    """
    gpu = np.arange(phy2log.size) // (phy2log.size // num_gpus)
    share = optimal_split(phy2log, w, num_gpus)
    load = split_loads(phy2log, share, w, num_gpus)
    evals = 0
    while evals < max_evals and imbalance_of(load) > 1 + 1e-3:  # within 0.1 % of perfect: stop
        top = int(np.argmax(load))
        amount = w[phy2log] * share
        mine = np.flatnonzero(gpu == top)
        mine = mine[np.argsort(-amount[mine], kind="stable")]
        others = np.flatnonzero(gpu != top)
        others = others[np.lexsort((amount[others], load[gpu[others]]))]  # lightest GPUs first
        copies = np.bincount(phy2log, minlength=w.size)
        trials = []
        for a in mine:  # copy a busy unit over a slot whose unit keeps another copy
            if amount[a] > 0:
                for s in others:
                    if copies[phy2log[s]] >= 2 and phy2log[a] not in phy2log[gpu == gpu[s]]:
                        trials.append((s, a, False))
        trials += [(a, s, True) for a in mine for s in others if phy2log[s] != phy2log[a]]
        improved = False
        for s, a, swap in trials[: max_evals - evals]:
            trial = phy2log.copy()
            trial[s] = phy2log[a]
            if swap:
                trial[a] = phy2log[s]
            evals += 1
            trial_share = optimal_split(trial, w, num_gpus)
            trial_load = split_loads(trial, trial_share, w, num_gpus)
            if imbalance_of(trial_load) < imbalance_of(load) - 1e-6:
                phy2log, share, load, improved = trial, trial_share, trial_load, True
                break
        if not improved:
            break
    return phy2log, share


def plan_balanced(
    weight: np.ndarray,
    num_gpus: int,
    num_replicas: int,
    *,
    split: str = "chosen",
    search: int = 200,
    samples: np.ndarray | None = None,
) -> Placement:
    """Best of refined EPLB and Fair-Copying per layer for `weight: [L, E]`, then local search.

    samples: optional [T, L, E] per-step loads (e.g. the recent history); then each layer keeps,
    of the chosen-split plan, the refined even-split plan and plain EPLB, the one with the lowest
    mean per-step max / mean load on them (step-to-step noise can favour even splits).
    """
    if split not in ("chosen", "even"):
        raise InputError(f"split: expected 'chosen' or 'even', got {split!r}")
    if not isinstance(search, (int, np.integer)) or search < 0:
        raise InputError(f"search: expected a non-negative number of LP evaluations, got {search!r}")
    num_experts = weight.shape[1]
    base = plan_eplb(weight, num_gpus, num_replicas)
    per_slot = np.take_along_axis(weight, base.phy2log, 1) * base.share
    phy2log = np.stack([swap_refine(p, s, num_gpus) for p, s in zip(base.phy2log, per_slot)])
    if split == "even":
        return Placement(phy2log, even_share(phy2log, num_experts), num_gpus, weight, "balanced", {"split": split})
    share = np.stack([optimal_split(p, w, num_gpus) for p, w in zip(phy2log, weight)])
    refined = Placement(phy2log, share, num_gpus, weight, "balanced")
    fair = plan_fair_copying(weight, num_gpus, num_replicas)
    take_fair = imbalance_of(fair.gpu_load) < imbalance_of(refined.gpu_load) - 1e-12
    start = np.where(take_fair[:, None], fair.phy2log, refined.phy2log)
    phy2log = start
    if search > 0:
        phy2log = np.stack([split_search(p, w, num_gpus, search)[0] for p, w in zip(start, weight)])
    share = np.stack([optimal_split(p, w, num_gpus, even_tiebreak=True) for p, w in zip(phy2log, weight)])
    chosen = Placement(phy2log, share, num_gpus, weight, "balanced",
                       {"split": split, "search": search, "fair_copying_layers": take_fair})
    if samples is None:
        return chosen
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 3 or samples.shape[1:] != weight.shape:
        raise InputError(f"samples: expected shape [T, {weight.shape[0]}, {weight.shape[1]}], got {samples.shape}")
    refined_even = Placement(refined.phy2log, even_share(refined.phy2log, num_experts), num_gpus, weight)
    candidates = [chosen, refined_even, base]
    score = np.stack([c.evaluate(samples).imbalance.mean(0) for c in candidates])  # [3, L]
    pick = np.argmin(score, axis=0)  # ties keep the chosen split
    rows = np.arange(weight.shape[0])
    return Placement(np.stack([c.phy2log for c in candidates])[pick, rows],
                     np.stack([c.share for c in candidates])[pick, rows], num_gpus, weight, "balanced",
                     {**chosen.info, "picked": np.array(["chosen", "refined_even", "eplb"])[pick]})
