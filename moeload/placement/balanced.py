"""moeload's own policy: EPLB replication and packing, swap refinement, then the best split.

Per layer it builds two candidates under the chosen split:
1. EPLB's global plan, refined by pairwise slot swaps between the busiest GPU and any other GPU
   while that lowers the larger of the two loads, and by moving replicas from light units to the
   heavy units of the busiest GPU (re-packing each time) while that lowers the maximum (even
   split, at most `search` re-packs), then re-split optimally (LP);
2. the Fair-Copying plan (best-effort assignment, copies of the busiest GPU's heaviest unit, LP
   split).
then improves both by local search under the optimal split and keeps the better end point: copy
a unit of the busiest GPU into a slot whose unit has another copy, or swap a slot of the busiest
GPU with any other slot, taking the first move that lowers the LP optimum, for at most `search`
LP evaluations per start and layer.
The final split is the optimal one closest to even (`optimal_split(..., even_tiebreak=True)`).
With `split="even"` only candidate 1 is used, without the LP re-split or the split search.
"""

from __future__ import annotations

import numpy as np

from moeload.errors import InputError
from moeload.placement._placement import Placement, even_share, gpu_loads, imbalance_of, slot_gpu
from moeload.placement._split import optimal_split, split_loads
from moeload.placement.eplb import balanced_packing, plan_eplb
from moeload.placement.fair_copying import plan_fair_copying


def swap_refine(phy2log: np.ndarray, per_slot: np.ndarray, num_gpus: int, max_rounds: int = 1000) -> np.ndarray:
    """Swap slots between the busiest GPU and another GPU while that lowers their larger load.

    phy2log, per_slot: [R] unit and load of each slot. Returns the refined `phy2log: [R]`.
    Each swap lowers the sorted GPU-load vector lexicographically, so the loop ends.
    """
    phy2log, per_slot = phy2log.copy(), per_slot.copy()
    slots = phy2log.shape[0] // num_gpus
    for _ in range(max_rounds):
        load = gpu_loads(per_slot, num_gpus)
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


def _pack_even(w: np.ndarray, count: np.ndarray, num_gpus: int) -> tuple[np.ndarray, float]:
    """Replica counts `count: [E]` -> EPLB packing + swap refinement: `phy2log: [R]`, max GPU load."""
    phy2mlog = np.repeat(np.arange(w.size), count)
    per_replica = w[phy2mlog] / count[phy2mlog]
    pack, rank = balanced_packing(per_replica, num_gpus)
    order = np.empty_like(phy2mlog)
    order[pack * (phy2mlog.size // num_gpus) + rank] = np.arange(phy2mlog.size)
    phy2log = swap_refine(phy2mlog[order], per_replica[order], num_gpus)
    return phy2log, float(gpu_loads(w[phy2log] / count[phy2log], num_gpus).max())


def count_search(phy2log: np.ndarray, w: np.ndarray, num_gpus: int, max_evals: int, top: int = 3) -> np.ndarray:
    """Even split: move one replica from a light unit to a heavy one while the max GPU load drops.

    Heavy: the `top` units with the largest per-replica load on the busiest GPU; light: the `top`
    units with two or more replicas and the smallest per-replica load. Each trial re-packs (EPLB
    packing + swaps). Returns the best `phy2log: [R]` found within `max_evals` trials.
    """
    count = np.bincount(phy2log, minlength=w.size)
    per_slot = w[phy2log] / count[phy2log]
    best = float(gpu_loads(per_slot, num_gpus).max())
    mean = w.sum() / num_gpus
    evals = 0
    while evals < max_evals and mean > 0 and best > mean * (1 + 1e-3):
        slots = phy2log.size // num_gpus
        busiest = int(np.argmax(gpu_loads(w[phy2log] / count[phy2log], num_gpus)))
        on_top = phy2log[busiest * slots : (busiest + 1) * slots]
        heavy = [int(u) for u in on_top[np.argsort(-(w[on_top] / count[on_top]), kind="stable")]][:top]
        spare = np.flatnonzero(count >= 2)
        light = spare[np.argsort(w[spare] / count[spare], kind="stable")][:top]
        improved = False
        for a in dict.fromkeys(heavy):
            for b in light:
                if a == b or evals >= max_evals:
                    continue
                trial = count.copy()
                trial[a] += 1
                trial[b] -= 1
                evals += 1
                layout, value = _pack_even(w, trial, num_gpus)
                if value < best * (1 - 1e-9):
                    phy2log, count, best, improved = layout, trial, value, True
                    break
            if improved:
                break
        if not improved:
            break
    return phy2log


def split_search(phy2log: np.ndarray, w: np.ndarray, num_gpus: int, max_evals: int) -> tuple[np.ndarray, np.ndarray]:
    """Local search over one layer's copy layout `phy2log: [R]` for loads `w: [E]`, optimal split.

    Returns the improved `phy2log: [R]` and its `share: [R]`.
    """
    gpu = slot_gpu(phy2log.size, num_gpus)
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
    if search > 0:
        phy2log = np.stack([count_search(p, w, num_gpus, search) for p, w in zip(phy2log, weight)])
    if split == "even":
        return Placement(phy2log, even_share(phy2log, num_experts), num_gpus, weight, "balanced", {"split": split})
    share = np.stack([optimal_split(p, w, num_gpus) for p, w in zip(phy2log, weight)])
    refined = Placement(phy2log, share, num_gpus, weight, "balanced")
    fair = plan_fair_copying(weight, num_gpus, num_replicas)
    take_fair = imbalance_of(fair.gpu_load) < imbalance_of(refined.gpu_load) - 1e-12
    phy2log = np.where(take_fair[:, None], fair.phy2log, refined.phy2log)
    if search > 0:  # search from both starts; keep the better end point
        ends = [
            [split_search(p, w, num_gpus, search) for p, w in zip(start.phy2log, weight)] for start in (refined, fair)
        ]
        value = np.array(
            [[imbalance_of(split_loads(p, sh, w, num_gpus)) for (p, sh), w in zip(e, weight)] for e in ends]
        )  # [2, L]
        take_fair = value[1] < value[0] - 1e-12
        phy2log = np.stack([ends[int(f)][i][0] for i, f in enumerate(take_fair)])
    share = np.stack([optimal_split(p, w, num_gpus, even_tiebreak=True) for p, w in zip(phy2log, weight)])
    chosen = Placement(
        phy2log,
        share,
        num_gpus,
        weight,
        "balanced",
        {"split": split, "search": search, "fair_copying_layers": take_fair},
    )
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
    return Placement(
        np.stack([c.phy2log for c in candidates])[pick, rows],
        np.stack([c.share for c in candidates])[pick, rows],
        num_gpus,
        weight,
        "balanced",
        {**chosen.info, "picked": np.array(["chosen", "refined_even", "eplb"])[pick]},
    )
