"""FairKV-style placement (arXiv 2502.15804): best-effort assignment plus Fair-Copying.

Best-effort: units go heaviest first to the lightest GPU with a free slot (LPT), at most
ceil(E / G) per GPU so that every GPU keeps room for copies. Fair-Copying: each
extra slot copies the heaviest unit of the most loaded GPU onto the lightest GPU with a free slot,
and the unit's work is split between its copies by water-filling (data parallel, uneven split);
finally the split of all copies is re-solved jointly as a linear program (`lp_split=True`).
"""

from __future__ import annotations

import numpy as np

from moeload.placement._placement import Placement
from moeload.placement._split import optimal_split, water_fill


def _layer(w: np.ndarray, num_gpus: int, num_replicas: int) -> tuple[np.ndarray, np.ndarray]:
    """One layer `w: [E]` -> `slot_unit: [R]`, `amount: [R]` (slots grouped by GPU)."""
    slots = num_replicas // num_gpus
    # Best-effort keeps the per-GPU unit count balanced so that every GPU keeps room for copies.
    first_pass = min(slots, -(-w.shape[0] // num_gpus))
    hosted: list[list[int]] = [[] for _ in range(num_gpus)]
    amount: list[dict[int, float]] = [{} for _ in range(num_gpus)]
    loads = np.zeros(num_gpus)
    for unit in np.argsort(-w, kind="stable"):
        free = np.flatnonzero([len(h) < first_pass for h in hosted])
        g = int(free[np.argmin(loads[free])])
        hosted[g].append(int(unit))
        amount[g][int(unit)] = float(w[unit])
        loads[g] += w[unit]
    for _ in range(num_replicas - w.shape[0]):
        has_room = np.array([len(h) < slots for h in hosted])
        unit, target = _pick_copy(hosted, amount, loads, has_room, w)
        hosted[target].append(unit)
        amount[target].setdefault(unit, 0.0)
        gpus = [g for g in range(num_gpus) if unit in amount[g]]
        base = np.array([loads[g] - amount[g][unit] for g in gpus])
        for g, x in zip(gpus, water_fill(base, float(w[unit]))):
            loads[g] += x - amount[g][unit]
            amount[g][unit] = float(x)
    slot_unit = np.array([u for h in hosted for u in h], dtype=np.int64)
    # A unit held twice by one GPU (only when nothing else fits) shares that GPU's amount.
    return slot_unit, np.array([amount[g][u] / h.count(u) for g, h in enumerate(hosted) for u in h])


def _pick_copy(hosted, amount, loads, has_room, w) -> tuple[int, int]:
    """The unit to copy (heaviest part of the busiest GPU that can go elsewhere) and its target GPU."""
    for g in np.argsort(-loads, kind="stable"):
        for unit in sorted(amount[g], key=lambda u: -amount[g][u]):
            targets = np.flatnonzero(has_room & np.array([unit not in a for a in amount]))
            if targets.size and amount[g][unit] > 0:
                return unit, int(targets[np.argmin(loads[targets])])
    # Every unit already sits on every GPU with room: duplicate the heaviest unit in place.
    targets = np.flatnonzero(has_room)
    return int(np.argmax(w)), int(targets[np.argmin(loads[targets])])


def plan_fair_copying(
    weight: np.ndarray, num_gpus: int, num_replicas: int, *, lp_split: bool = True
) -> Placement:
    """FairKV placement of `weight: [L, E]` onto `num_replicas` slots, uneven (chosen) split.

    With `num_replicas == E` this is the best-effort assignment alone (no copies).
    """
    rows, shares = [], []
    for w in weight:
        slot_unit, amount = _layer(w, num_gpus, num_replicas)
        if lp_split:
            share = optimal_split(slot_unit, w, num_gpus)
        else:
            share = np.where(w[slot_unit] > 0, amount / np.where(w[slot_unit] > 0, w[slot_unit], 1.0), 0.0)
            idle = w[slot_unit] <= 0
            share[idle] = 1.0 / np.bincount(slot_unit, minlength=w.shape[0])[slot_unit[idle]]
        rows.append(slot_unit)
        shares.append(share)
    return Placement(np.stack(rows), np.stack(shares), num_gpus, weight, "fair_copying", {"lp_split": lp_split})
