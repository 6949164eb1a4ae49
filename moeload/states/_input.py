"""Checking and normalising the load input shared by `states` and `evaluation`.

Accepted input: proportions `[S, L, E]` (float, each row sums to 1 over experts, or is all NaN for a
step where the layer saw no tokens), integer counts `[S, L, E]` (converted to proportions, and
their row sums give the routed assignments per step), or a `moeload.trace.Trace`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from moeload.errors import InputError

ROW_SUM_TOL = 1e-6


@dataclasses.dataclass
class LoadInput:
    """p: [S, L, E] proportions (NaN rows = no tokens); steps: [S] step numbers (indices when
    unknown); assignments: [S, L] routed (token, expert) assignments per step or None;
    top_k: [L]; experts: [L] experts per layer (columns past it are padding);
    gpu_map: [L, E] expert -> GPU recorded in a trace, or None; from_trace: steps are trace steps."""

    p: np.ndarray
    steps: np.ndarray
    assignments: np.ndarray | None
    top_k: np.ndarray
    experts: np.ndarray
    gpu_map: np.ndarray | None
    from_trace: bool


def _is_trace(obj: Any) -> bool:
    return hasattr(obj, "proportions") and hasattr(obj, "counts") and hasattr(obj, "steps")


def load_input(p: Any, name: str = "p", steps: Any = None, tokens: Any = None) -> LoadInput:
    """Validate `p` (array [S, L, E] or Trace) and return a LoadInput; bad input -> InputError."""
    gpu_map = None
    if _is_trace(p):
        counts = np.asarray(p.counts())
        man = getattr(p, "manifest", None)
        L = counts.shape[1]
        top_k = np.asarray(getattr(p, "top_k", [1] * L), dtype=np.int64)
        experts = np.asarray(getattr(p, "experts_per_layer", [counts.shape[2]] * L), dtype=np.int64)
        if man is not None and getattr(man, "ep_size", 1) > 1:
            gpu_map = np.full((L, counts.shape[2]), -1, dtype=np.int64)
            for li, row in enumerate(man.rank_map()):
                gpu_map[li, : len(row)] = row
        out = _from_array(counts, name, np.asarray(p.steps, dtype=np.int64), None)
        out.top_k, out.experts, out.gpu_map, out.from_trace = top_k, experts, gpu_map, True
        return out
    return _from_array(p, name, steps, tokens)


def _from_array(p: Any, name: str, steps: Any, tokens: Any) -> LoadInput:
    try:
        a = np.asarray(p)
    except Exception as exc:  # ragged lists and the like
        raise InputError(f"{name}: cannot be read as an array ({exc})") from None
    if a.ndim != 3:
        raise InputError(
            f"{name}: expected proportions [steps, layers, experts] (3 dims), got shape {a.shape}; "
            "for one layer use p[:, None, :]"
        )
    if a.shape[0] == 0 or a.shape[1] == 0 or a.shape[2] < 2:
        raise InputError(f"{name}: needs at least 1 step, 1 layer and 2 experts, got shape {a.shape}")
    if a.dtype.kind in "iub":
        if (a < 0).any():
            raise InputError(f"{name}: counts must be non-negative, found {int(a.min())}")
        c = a.astype(np.float64)
        tot = c.sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            prop = np.where(tot[..., None] > 0, c / np.where(tot > 0, tot, 1)[..., None], np.nan)
        assignments = tot
    elif a.dtype.kind == "f":
        prop = a.astype(np.float64, copy=False)
        _check_proportions(prop, name)
        assignments = None
    else:
        raise InputError(f"{name}: expected a numeric array, got dtype {a.dtype}")
    S, L, E = prop.shape
    if tokens is not None:
        assignments = np.asarray(tokens, dtype=np.float64)
        if assignments.ndim == 1:
            assignments = np.repeat(assignments[:, None], L, axis=1)
        if assignments.shape != (S, L) or (assignments < 0).any():
            raise InputError(f"tokens: expected non-negative [steps] or [steps, layers] = [{S}, {L}], got {assignments.shape}")
    if steps is None:
        st = np.arange(S, dtype=np.int64)
    else:
        st = np.asarray(steps, dtype=np.int64)
        if st.shape != (S,) or (S > 1 and (np.diff(st) <= 0).any()):
            raise InputError(f"steps: expected {S} strictly increasing step numbers, got shape {st.shape}")
    return LoadInput(prop, st, assignments, np.ones(L, np.int64), np.full(L, E, np.int64), None, steps is not None)


def _check_proportions(p: np.ndarray, name: str) -> None:
    nan = np.isnan(p)
    row_nan = nan.all(-1)
    if (nan.any(-1) & ~row_nan).any():
        s, li = np.argwhere(nan.any(-1) & ~row_nan)[0]
        raise InputError(f"{name}: row (step {s}, layer {li}) is partly NaN; a row is either all NaN (no tokens) or all numbers")
    if np.isinf(p).any():
        raise InputError(f"{name}: contains inf")
    if (p[~nan] < 0).any():
        raise InputError(f"{name}: proportions must be non-negative, found {float(np.nanmin(p)):.3g}")
    sums = np.nansum(p, -1)
    bad = ~row_nan & (np.abs(sums - 1.0) > ROW_SUM_TOL)
    if bad.any():
        s, li = np.argwhere(bad)[0]
        raise InputError(
            f"{name}: rows must sum to 1 over experts; step {s}, layer {li} sums to {sums[s, li]:.6g} "
            "(pass integer counts to have them normalised)"
        )


def int_param(value: Any, name: str, lo: int = 1) -> int:
    """An integer parameter >= lo, else InputError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise InputError(f"{name}: expected an integer >= {lo}, got {value!r}")
    return int(value)


def pos_param(value: Any, name: str) -> float:
    """A finite positive float parameter, else InputError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected a positive number, got {value!r}") from None
    if not np.isfinite(v) or v <= 0:
        raise InputError(f"{name}: expected a positive number, got {value!r}")
    return v
