"""Timing: one step timed alone, the hook's cost per router forward, and the paired summary."""

from __future__ import annotations

import math
import time

import numpy as np
import torch


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def hook_cost(hooked, bare, x: torch.Tensor, device: torch.device, rounds: int = 30, calls: int = 50) -> dict:
    """Per-forward cost of the tracer's hook: the same router forward with and without it, interleaved.

    hooked, bare: routers with identical weights, `hooked` under a running LoadTracer; x: [T, H].
    """
    per = {"hooked": [], "bare": []}
    with torch.no_grad():
        for r in range(rounds):
            for name, mod in [("hooked", hooked), ("bare", bare)][:: 1 if r % 2 == 0 else -1]:
                dt = timed(lambda mod=mod: [mod(x) for _ in range(calls)], device)
                per[name].append(dt / calls)
    h, b = np.median(per["hooked"]), np.median(per["bare"])
    return {"router_forward_us": float(1e6 * b), "hook_us": float(1e6 * (h - b)), "rounds": rounds, "calls": calls}


def summarize(traced: np.ndarray, plain: np.ndarray) -> dict:
    """traced, plain: [n] paired step times (s) -> means, medians, overhead % with a 95 % t-interval."""
    from scipy import stats

    d = traced - plain
    n = len(d)
    base = plain.mean()
    half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    return {
        "n_pairs": n,
        "traced_mean_s": float(traced.mean()),
        "plain_mean_s": float(base),
        "traced_median_s": float(np.median(traced)),
        "plain_median_s": float(np.median(plain)),
        "overhead_pct": float(100 * d.mean() / base),
        "overhead_ci95_pct": [float(100 * (d.mean() - half) / base), float(100 * (d.mean() + half) / base)],
        "overhead_median_pct": float(100 * (np.median(traced) - np.median(plain)) / np.median(plain)),
    }
