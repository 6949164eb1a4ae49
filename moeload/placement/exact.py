"""Exact placement by mixed-integer programming (scipy.optimize.milp / HiGHS), for small instances.

`split="chosen"`: a unit may be split unevenly among its copies; variables x[u, g] >= 0 (load of
unit u on GPU g), z[u, g] in {0, 1} (u has a copy on g); sum_g x[u, g] = w_u, x <= w_u z,
sum_g z[u, g] >= 1, sum_u z[u, g] <= S, sum_u x[u, g] <= t; minimise t. Slots left free are then
filled with copies of the heaviest units and the split is re-solved (never worse).

`split="even"`: each unit has c copies and each serves w_u / c; variables b[u, c] in {0, 1} (u has
c copies) and m[u, c, g] integer (copies of u on g if it has c), sum_c b = 1,
sum_g m[u, c, g] = c b[u, c], sum_{u, c} m[u, c, g] = S, sum_{u, c} m w_u / c <= t.

Both measure how far the greedy policies are from optimal; `time_limit` (s) caps the solver per
layer, after which the best solution found is returned (`info["optimal"]` says which layers were
proven optimal).
"""

from __future__ import annotations

import numpy as np

from moeload.errors import InputError
from moeload.placement._placement import Placement
from moeload.placement._split import optimal_split


def _solve(cost, constraints, integrality, bounds, time_limit):
    from scipy.optimize import Bounds, milp

    res = milp(
        cost,
        constraints=constraints,
        integrality=integrality,
        bounds=Bounds(*bounds),
        options={"time_limit": time_limit},
    )
    if res.x is None:
        raise InputError(f"exact: the MILP found no solution within time_limit={time_limit} s ({res.message})")
    return res.x, res.status == 0


def _chosen_layer(w: np.ndarray, num_gpus: int, slots: int, time_limit: float):
    from scipy.optimize import LinearConstraint
    from scipy.sparse import lil_matrix

    e, g = w.shape[0], num_gpus
    n = 2 * e * g + 1
    x = lambda u, k: u * g + k  # noqa: E731
    z = lambda u, k: e * g + u * g + k  # noqa: E731
    rows = lil_matrix((2 * e + e * g + 2 * g + max(g - 1, 0), n))
    lo: list[float] = []  # row bounds of the constraint matrix
    hi: list[float] = []
    r = 0
    for u in range(e):
        for k in range(g):
            rows[r, x(u, k)] = 1.0
        lo.append(w[u])
        hi.append(w[u])
        r += 1
        for k in range(g):
            rows[r, z(u, k)] = 1.0
        lo.append(1.0)
        hi.append(g)
        r += 1
        for k in range(g):
            rows[r, x(u, k)], rows[r, z(u, k)] = 1.0, -w[u]
            lo.append(-np.inf)
            hi.append(0.0)
            r += 1
    for k in range(g):
        for u in range(e):
            rows[r, z(u, k)] = 1.0
        lo.append(1.0)
        hi.append(slots)
        r += 1
        for u in range(e):
            rows[r, x(u, k)] = 1.0
        rows[r, n - 1] = -1.0
        lo.append(-np.inf)
        hi.append(0.0)
        r += 1
    for k in range(g - 1):  # identical GPUs: order them by load to cut symmetric solutions
        for u in range(e):
            rows[r, x(u, k)], rows[r, x(u, k + 1)] = 1.0, -1.0
        lo.append(0.0)
        hi.append(np.inf)
        r += 1
    integrality = np.r_[np.zeros(e * g), np.ones(e * g), 0]
    upper = np.r_[np.repeat(w, g), np.ones(e * g), np.inf]
    cost = np.zeros(n)
    cost[-1] = 1.0
    sol, optimal = _solve(cost, LinearConstraint(rows.tocsr(), lo, hi), integrality, (np.zeros(n), upper), time_limit)
    present = sol[e * g : 2 * e * g].reshape(e, g) > 0.5
    hosted = [[int(u) for u in np.flatnonzero(present[:, k])] for k in range(g)]
    for k in range(g):  # fill free slots with the heaviest units this GPU lacks, then duplicates
        for u in np.argsort(-w, kind="stable"):
            if len(hosted[k]) >= slots:
                break
            if u not in hosted[k]:
                hosted[k].append(int(u))
        while len(hosted[k]) < slots:
            hosted[k].append(hosted[k][0])
    phy2log = np.array([u for h in hosted for u in h], dtype=np.int64)
    return phy2log, optimal_split(phy2log, w, num_gpus, even_tiebreak=True), optimal


def _even_layer(w: np.ndarray, num_gpus: int, slots: int, time_limit: float):
    from scipy.optimize import LinearConstraint
    from scipy.sparse import lil_matrix

    e, g = w.shape[0], num_gpus
    cmax = slots * g - e + 1
    nm = e * cmax * g
    n = nm + e * cmax + 1
    m = lambda u, c, k: (u * cmax + c - 1) * g + k  # noqa: E731
    b = lambda u, c: nm + u * cmax + c - 1  # noqa: E731
    rows = lil_matrix((e + e * cmax + 2 * g, n))
    lo: list[float] = []  # row bounds of the constraint matrix
    hi: list[float] = []
    r = 0
    for u in range(e):
        for c in range(1, cmax + 1):
            rows[r, b(u, c)] = 1.0
        lo.append(1.0)
        hi.append(1.0)
        r += 1
        for c in range(1, cmax + 1):
            for k in range(g):
                rows[r, m(u, c, k)] = 1.0
            rows[r, b(u, c)] = -float(c)
            lo.append(0.0)
            hi.append(0.0)
            r += 1
    for k in range(g):
        for u in range(e):
            for c in range(1, cmax + 1):
                rows[r, m(u, c, k)] = 1.0
                rows[r + 1, m(u, c, k)] = w[u] / c
        lo += [slots, -np.inf]
        hi += [slots, 0.0]
        rows[r + 1, n - 1] = -1.0
        r += 2
    cost = np.zeros(n)
    cost[-1] = 1.0
    upper = np.r_[np.full(nm, float(slots)), np.ones(e * cmax), np.inf]
    integrality = np.r_[np.ones(nm + e * cmax), 0]
    sol, optimal = _solve(cost, LinearConstraint(rows.tocsr(), lo, hi), integrality, (np.zeros(n), upper), time_limit)
    copies = np.rint(sol[:nm]).astype(np.int64).reshape(e, cmax, g).sum(1)
    phy2log = np.concatenate([np.repeat(np.arange(e), copies[:, k]) for k in range(g)])
    return phy2log, 1.0 / copies.sum(1)[phy2log], optimal


def plan_exact(
    weight: np.ndarray, num_gpus: int, num_replicas: int, *, split: str = "chosen", time_limit: float = 20.0
) -> Placement:
    """Optimal placement of `weight: [L, E]` (per layer), for `split` "chosen" or "even"."""
    if split not in ("chosen", "even"):
        raise InputError(f"split: expected 'chosen' or 'even', got {split!r}")
    solve = _chosen_layer if split == "chosen" else _even_layer
    slots = num_replicas // num_gpus
    rows, shares, optimal = [], [], []
    for w in weight:
        scale = w.sum() / num_gpus
        phy2log, share, ok = solve(w / scale if scale > 0 else w, num_gpus, slots, time_limit)
        rows.append(phy2log)
        shares.append(share)
        optimal.append(ok)
    return Placement(
        np.stack(rows), np.stack(shares), num_gpus, weight, "exact", {"split": split, "optimal": np.array(optimal)}
    )
