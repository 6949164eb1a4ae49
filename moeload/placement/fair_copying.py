"""FairKV-style placement (arXiv 2502.15804): best-effort assignment plus Fair-Copying.

Best-effort: units go heaviest first to the lightest GPU with a free slot (LPT), at most
ceil(E / G) per GPU so that every GPU keeps room for copies. Fair-Copying: each extra slot copies
the heaviest unit of the most loaded GPU onto the lightest GPU that lacks it (if that GPU is full,
its lightest unit moves to a GPU with room, when that gives the lower maximum), and the unit's work
is split between its copies by water-filling (data parallel, uneven split); finally the split of
all copies is re-solved jointly as a linear program (`lp_split=True`), optimal and closest to even.
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
        _copy_once(hosted, amount, loads, slots, w)
    slot_unit = np.array([u for h in hosted for u in h], dtype=np.int64)
    # A unit held twice by one GPU (only when nothing else fits) shares that GPU's amount.
    return slot_unit, np.array([amount[g][u] / h.count(u) for g, h in enumerate(hosted) for u in h])


def _spread(amount, loads, unit: int, total: float) -> None:
    """Water-fill `unit`'s `total` load over the GPUs that hold it (in place)."""
    gpus = [g for g in range(len(amount)) if unit in amount[g]]
    base = np.array([loads[g] - amount[g][unit] for g in gpus])
    for g, x in zip(gpus, water_fill(base, total)):
        loads[g] += x - amount[g][unit]
        amount[g][unit] = float(x)


def _copy_once(hosted, amount, loads, slots: int, w: np.ndarray) -> None:
    """Add one copy: the busiest GPU's heaviest unit goes to the lightest GPU without it.

    If that GPU is full, its lightest unit first moves to the lightest GPU with a free slot
    (when that lowers the resulting maximum more than copying to a GPU with room does).
    """
    room = [g for g in range(len(hosted)) if len(hosted[g]) < slots]
    top = int(np.argmax(loads))
    for unit in sorted(amount[top], key=lambda u: -amount[top][u]):
        without = [g for g in range(len(hosted)) if unit not in amount[g]]
        if not without or amount[top][unit] <= 0:
            continue
        # (resulting max load, tie-break, relocation (unit, from, to) or None)
        options: list[tuple[float, int, tuple[int, int, int] | None]] = []
        direct = [g for g in without if g in room]
        if direct:
            options.append((_trial(hosted, amount, loads, unit, min(direct, key=loads.__getitem__), None, w), 0, None))
        full = min((g for g in without if g not in room), key=loads.__getitem__, default=None)
        if full is not None:
            v = min(amount[full], key=amount[full].get)
            dest = [g for g in room if v not in amount[g]]
            if dest:
                move = (v, full, min(dest, key=loads.__getitem__))
                options.append((_trial(hosted, amount, loads, unit, full, move, w), 1, move))
        if options:
            _, _, chosen = min(options, key=lambda o: (o[0], o[1]))
            target = min(direct, key=loads.__getitem__) if chosen is None else chosen[1]
            _apply(hosted, amount, loads, unit, target, chosen, w)
            return
    # Every unit already sits on every GPU with room: duplicate the heaviest unit in place.
    _apply(hosted, amount, loads, int(np.argmax(w)), min(room, key=loads.__getitem__), None, w)


def _apply(hosted, amount, loads, unit, target, move, w) -> None:
    if move is not None:
        v, src, dst = move
        hosted[src].remove(v)
        hosted[dst].append(v)
        x = amount[src].pop(v)
        amount[dst][v] = x
        loads[src] -= x
        loads[dst] += x
    hosted[target].append(unit)
    amount[target].setdefault(unit, 0.0)
    _spread(amount, loads, unit, float(w[unit]))


def _trial(hosted, amount, loads, unit, target, move, w) -> float:
    h = [list(x) for x in hosted]
    a = [dict(x) for x in amount]
    ld = loads.copy()
    _apply(h, a, ld, unit, target, move, w)
    return float(ld.max())


def plan_fair_copying(weight: np.ndarray, num_gpus: int, num_replicas: int, *, lp_split: bool = True) -> Placement:
    """FairKV placement of `weight: [L, E]` onto `num_replicas` slots, uneven (chosen) split.

    With `num_replicas == E` this is the best-effort assignment alone (no copies).
    """
    rows, shares = [], []
    for w in weight:
        slot_unit, amount = _layer(w, num_gpus, num_replicas)
        if lp_split:
            share = optimal_split(slot_unit, w, num_gpus, even_tiebreak=True)
        else:
            share = np.where(w[slot_unit] > 0, amount / np.where(w[slot_unit] > 0, w[slot_unit], 1.0), 0.0)
            idle = w[slot_unit] <= 0
            share[idle] = 1.0 / np.bincount(slot_unit, minlength=w.shape[0])[slot_unit[idle]]
        rows.append(slot_unit)
        shares.append(share)
    return Placement(np.stack(rows), np.stack(shares), num_gpus, weight, "fair_copying", {"lp_split": lp_split})
