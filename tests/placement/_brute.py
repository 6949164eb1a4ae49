"""Brute-force optimal imbalance for tiny placement instances (test oracle, independent of the MILP)."""

from __future__ import annotations

import itertools

import numpy as np


def brute_even(w: np.ndarray, num_gpus: int, slots: int) -> float:
    """Min over all slot fillings of max / mean GPU load, each unit split evenly over its copies."""
    e = w.shape[0]
    mean = w.sum() / num_gpus
    best = np.inf
    per_gpu = list(itertools.combinations_with_replacement(range(e), slots))
    for fill in itertools.product(per_gpu, repeat=num_gpus):
        copies = np.bincount(np.concatenate(fill), minlength=e)
        if (copies == 0).any():
            continue
        best = min(best, max(sum(w[u] / copies[u] for u in g) for g in fill))
    return best / mean if mean > 0 else 1.0


def brute_chosen(w: np.ndarray, num_gpus: int, slots: int) -> float:
    """Min over all copy layouts of the optimal split's max / mean GPU load.

    For fixed copy sets P_u the best level is max over GPU subsets G' of
    (sum of w_u with P_u inside G') / |G'| (supply-demand theorem for fractional assignment).
    """
    e = w.shape[0]
    mean = w.sum() / num_gpus
    subsets = [frozenset(c) for k in range(1, min(slots, e) + 1) for c in itertools.combinations(range(e), k)]
    gpu_sets = [frozenset(c) for k in range(1, num_gpus + 1) for c in itertools.combinations(range(num_gpus), k)]
    best = np.inf
    for layout in itertools.product(subsets, repeat=num_gpus):
        hosts = [frozenset(g for g in range(num_gpus) if u in layout[g]) for u in range(e)]
        if any(not h for h in hosts):
            continue
        level = max(sum(w[u] for u in range(e) if hosts[u] <= gs) / len(gs) for gs in gpu_sets)
        best = min(best, level)
    return best / mean if mean > 0 else 1.0
