"""Chosen (uneven) splits of a replicated unit's load among its copies."""

from __future__ import annotations

import numpy as np

from moeload.placement._placement import slot_gpu as slot_gpu_of


def water_fill(base: np.ndarray, amount: float) -> np.ndarray:
    """Pour `amount` onto bins of level `base: [k]`, lowest first, to a common level.

    Returns `x: [k]` >= 0 with `x.sum() == amount` and `base + x` level wherever `x > 0`.
    """
    order = np.sort(base)
    k = base.shape[0]
    level = order[0] + amount
    for i in range(1, k + 1):
        level = (order[:i].sum() + amount) / i
        if i == k or level <= order[i]:
            break
    return np.maximum(level - base, 0.0)


def optimal_split(phy2log: np.ndarray, weight: np.ndarray, num_gpus: int, *, even_tiebreak: bool = False) -> np.ndarray:
    """Split that minimises the max GPU load for one layer's copies (a linear program).

    phy2log: [R] unit of each slot (slot s on GPU `slot_gpu(R, num_gpus)[s]`); weight: [E].
    even_tiebreak: among the optimal splits take the one closest (L1) to the even split (a second
    LP), so that copies share a unit's work as evenly as the optimum allows: step-to-step noise of
    a unit is then spread over its copies instead of landing on one of them.
    Returns `share: [R]`, the fraction of its unit's load each slot serves (even for idle units).
    """
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix

    num_slots = phy2log.shape[0]
    num_experts = weight.shape[0]
    total = weight.sum()
    share = 1.0 / np.bincount(phy2log, minlength=num_experts)[phy2log]
    if total <= 0:
        return share
    w = weight * (num_gpus / total)  # mean GPU load 1: the objective is the imbalance
    slot_gpu = slot_gpu_of(num_slots, num_gpus)
    cols = np.arange(num_slots)
    a_eq = csr_matrix((np.ones(num_slots), (phy2log, cols)), shape=(num_experts, num_slots + 1))
    a_ub = csr_matrix(
        (
            np.r_[np.ones(num_slots), -np.ones(num_gpus)],
            (np.r_[slot_gpu, np.arange(num_gpus)], np.r_[cols, np.full(num_gpus, num_slots)]),
        ),
        shape=(num_gpus, num_slots + 1),
    )
    cost = np.zeros(num_slots + 1)
    cost[-1] = 1.0
    res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(num_gpus), A_eq=a_eq, b_eq=w, method="highs")
    if res.status != 0:
        return share
    x = np.maximum(res.x[:num_slots], 0.0)
    if even_tiebreak:
        x = _closest_to_even(x, phy2log, w, slot_gpu, num_gpus, res.x[-1], share, linprog)
    unit_total = np.bincount(phy2log, weights=x, minlength=num_experts)
    busy = unit_total[phy2log] > 0
    share[busy] = x[busy] / unit_total[phy2log][busy]
    return share


def _closest_to_even(x, phy2log, w, slot_gpu, num_gpus, level, even, linprog):
    """Second stage: keep every GPU at or below `level`, minimise sum |x - even split|."""
    from scipy.sparse import csr_matrix, hstack, identity, vstack

    n = phy2log.shape[0]
    target = w[phy2log] * even
    eye = identity(n, format="csr")
    a_eq = hstack(
        [csr_matrix((np.ones(n), (phy2log, np.arange(n))), shape=(w.shape[0], n)), csr_matrix((w.shape[0], n))]
    )
    gpu_rows = csr_matrix((np.ones(n), (slot_gpu, np.arange(n))), shape=(num_gpus, n))
    a_ub = vstack(
        [
            hstack([gpu_rows, csr_matrix((num_gpus, n))]),  # GPU load <= level
            hstack([eye, -eye]),
            hstack([-eye, -eye]),
        ]
    )  # |x - target| <= d
    b_ub = np.r_[np.full(num_gpus, level * (1 + 1e-9) + 1e-12), target, -target]
    res = linprog(np.r_[np.zeros(n), np.ones(n)], A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=w, method="highs")
    return np.maximum(res.x[:n], 0.0) if res.status == 0 else x


def split_loads(phy2log: np.ndarray, share: np.ndarray, weight: np.ndarray, num_gpus: int) -> np.ndarray:
    """`phy2log, share: [R]`, `weight: [E]` -> `[num_gpus]` GPU loads of one layer."""
    gpu = slot_gpu_of(phy2log.size, num_gpus)
    return np.bincount(gpu, weights=weight[phy2log] * share, minlength=num_gpus)
