"""Checking and normalising the load input shared by `states`, `evaluation` and `predictors`.

Accepted input: proportions `[S, L, E]` or `[S, E]` for one layer (float, checked by
`check_proportions`, the one validator of proportions), integer counts of the same shapes
(converted to proportions, and their row sums give the routed assignments per step), or a
`moeload.trace.Trace`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from moeload.errors import InputError

ROW_SUM_TOL = 1e-3  # why this value: `check_proportions`


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


def _as_3d(a: np.ndarray, name: str) -> np.ndarray:
    """[S, L, E] or [S, E] (one layer) -> [S, L, E], at least one of each, else InputError."""
    if a.ndim == 2:
        a = a[:, None, :]
    if a.ndim != 3:
        raise InputError(
            f"{name}: expected proportions [steps, layers, experts] or [steps, experts] (one layer), "
            f"got shape {a.shape}"
        )
    if min(a.shape) == 0:
        raise InputError(f"{name}: empty array of shape {a.shape}; needs at least 1 step, 1 layer and 1 expert")
    return a


def _from_array(p: Any, name: str, steps: Any, tokens: Any) -> LoadInput:
    try:
        a = np.asarray(p)
    except Exception as exc:  # ragged lists and the like
        raise InputError(f"{name}: cannot be read as an array ({exc})") from None
    if a.dtype.kind not in "iubf":
        raise InputError(f"{name}: expected a numeric array, got dtype {a.dtype}")
    a = _as_3d(a, name)
    S, L, E = a.shape
    experts = np.full(L, E, np.int64)
    if a.dtype.kind in "iub":
        if (a < 0).any():
            raise InputError(f"{name}: counts must be non-negative, found {int(a.min())}")
        c = a.astype(np.float64)
        tot = c.sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            prop = np.where(tot[..., None] > 0, c / np.where(tot > 0, tot, 1)[..., None], np.nan)
        assignments = tot
    else:
        prop, mask = check_proportions(a, name)
        experts = mask.sum(1)
        trailing = np.arange(E)[None, :] < experts[:, None]
        if not (mask == trailing).all():
            li = int(np.flatnonzero((mask != trailing).any(1))[0])
            raise InputError(
                f"{name}: layer {li} has NaN (padding) expert columns before real ones; "
                "padding must be the last columns of a layer"
            )
        assignments = None
    if tokens is not None:
        assignments = np.asarray(tokens, dtype=np.float64)
        if assignments.ndim == 1:
            assignments = np.repeat(assignments[:, None], L, axis=1)
        if assignments.shape != (S, L) or (assignments < 0).any():
            raise InputError(
                f"tokens: expected non-negative [steps] or [steps, layers] = [{S}, {L}], got {assignments.shape}"
            )
    if steps is None:
        st = np.arange(S, dtype=np.int64)
    else:
        st = np.asarray(steps, dtype=np.int64)
        if st.shape != (S,) or (S > 1 and (np.diff(st) <= 0).any()):
            raise InputError(f"steps: expected {S} strictly increasing step numbers, got shape {st.shape}")
    return LoadInput(prop, st, assignments, np.ones(L, np.int64), experts, None, steps is not None)


def check_proportions(p: Any, name: str = "p") -> tuple[np.ndarray, np.ndarray]:
    """The one validator of proportions (states, evaluation and predictors call it).

    p: [S, L, E], or [S, E] for one layer. A row (step, layer) is either all NaN (the layer saw no
    tokens) or finite, non-negative numbers summing to 1 over experts within ROW_SUM_TOL; an expert
    column that is NaN in every row with numbers of its layer is padding (a layer with fewer
    experts). Returns (p [S, L, E] float64 with NaN rows kept, padding set to 0 and every other row
    divided by its sum, so that it sums to 1 to rounding; mask [L, E] True for the real experts).
    Bad input -> InputError naming `name` and the first bad row.

    ROW_SUM_TOL = 1e-3: the coarsest format proportions are commonly kept in is float16 (a softmax
    or a mean share in half precision): each value is rounded to within 2^-11 of itself, so a row
    of them misses 1 by up to 4.9e-4 — which 1e-6 (the old states check) refused for any layer;
    float32 and float64 rows are far inside. The mistakes the check is for (counts, rows
    normalised over the wrong axis, a missing expert column) miss 1 by far more than 1e-3. Rows
    are renormalised, so the tolerance never reaches a result.
    """
    try:
        arr = np.asarray(p, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: cannot be read as a numeric (float) array ({exc})") from None
    arr = _as_3d(arr, name)
    if np.isinf(arr).any():
        raise InputError(f"{name}: contains inf")
    nan = np.asarray(np.isnan(arr))
    row_nan = np.asarray(nan.all(axis=2))  # [S, L] steps without tokens
    has_tokens = np.asarray((~row_nan).any(axis=0))  # [L]
    pad = np.asarray(np.where(row_nan[:, :, None], True, nan).all(axis=0)) & has_tokens[:, None]  # [L, E]
    partial = nan & ~row_nan[:, :, None] & ~pad[None]
    if partial.any():
        t, li, e = np.argwhere(partial)[0]
        raise InputError(
            f"{name}: NaN at step {t}, layer {li}, expert {e}: the row is partly NaN; a row is all NaN "
            "(no tokens) or all numbers, and only whole padded expert columns may be NaN"
        )
    out = np.where(pad[None] & ~row_nan[:, :, None], 0.0, arr)  # rows without tokens stay all NaN
    if (out < 0).any():
        raise InputError(f"{name}: contains negative proportions (min {np.nanmin(out):.3g}); they must be non-negative")
    sums = out.sum(axis=2)  # NaN for rows without tokens
    bad = ~row_nan & (np.abs(sums - 1.0) > ROW_SUM_TOL)
    if bad.any():
        t, li = np.argwhere(bad)[0]
        raise InputError(
            f"{name}: row at step {t}, layer {li} sums to {sums[t, li]:.6g}; rows must sum to 1 over experts "
            f"(within {ROW_SUM_TOL:g}): pass integer counts to have them normalised"
        )
    with np.errstate(invalid="ignore"):
        out = out / np.where(row_nan, 1.0, sums)[:, :, None]
    return out, ~pad


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
