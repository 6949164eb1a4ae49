"""Result object, the hysteresis state machine and run-length segments shared by all detectors."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Per-step evidence codes fed to the state machine.
UNKNOWN, ENTER, BETWEEN, EXIT = -1, 0, 1, 2


@dataclasses.dataclass
class StateResult:
    """What `states.detect` returns.

    labels: [S, L] bool, True = stable. boundaries: [L] first step of the final stable phase
    (-1 if the layer ends transient). model_boundary: first step from which every layer stays
    stable to the end (-1 if none). fluctuation: [S, L] the statistic the rule thresholds (NaN
    where undefined). threshold: [S, L] the entry threshold it was compared with (NaN where the
    method has none). segments: per layer, list of (start, stop, stable) runs, stop exclusive.
    steps: [S] step numbers used in boundaries and segments (indices unless given a Trace or steps).
    """

    labels: np.ndarray
    boundaries: np.ndarray
    model_boundary: int
    fluctuation: np.ndarray
    threshold: np.ndarray
    segments: list[list[tuple[int, int, bool]]]
    steps: np.ndarray
    method: str
    params: dict[str, Any]

    def summary(self) -> str:
        """A few lines: boundary and stable share per layer."""
        lines = [f"method={self.method} model_boundary={self.model_boundary}"]
        for li, b in enumerate(self.boundaries):
            n_tr = sum(1 for s in self.segments[li] if not s[2])
            lines.append(f"layer {li}: boundary={int(b)} stable={self.labels[:, li].mean():.1%} transient_runs={n_tr}")
        return "\n".join(lines)


def hysteresis(codes: np.ndarray, min_run: int, state: bool = False, count: int = 0) -> tuple[np.ndarray, bool, int]:
    """Causal two-state machine over one layer's evidence codes [S] (UNKNOWN/ENTER/BETWEEN/EXIT).

    Transient -> stable after `min_run` consecutive ENTER steps; stable -> transient after
    `min_run` consecutive EXIT steps; UNKNOWN steps change nothing; any other code resets the count.
    The label of a step is the state after its own evidence. Returns (labels [S], state, count) so
    that a stream can continue where a block stopped.
    """
    S = len(codes)
    labels = np.empty(S, dtype=bool)
    if S == 0:
        return labels, state, count
    change = np.flatnonzero(codes[1:] != codes[:-1]) + 1
    starts = np.concatenate(([0], change))
    stops = np.concatenate((change, [S]))
    for a, b in zip(starts, stops):
        v, n = codes[a], b - a
        if v == UNKNOWN:
            labels[a:b] = state
            continue
        towards = EXIT if state else ENTER
        if v != towards:
            count = 0
            labels[a:b] = state
            continue
        need = min_run - count
        if n >= need:
            flip = a + need - 1
            labels[a:flip] = state
            state = not state
            labels[flip:b] = state
            count = 0  # after the flip the same code is no evidence for flipping back
        else:
            count += n
            labels[a:b] = state
    return labels, state, count


def segments_of(labels: np.ndarray, steps: np.ndarray) -> list[tuple[int, int, bool]]:
    """Runs of one layer's labels [S] as (start_step, stop_step, stable); stop is the next run's
    first step, or the last step + 1."""
    S = len(labels)
    if S == 0:
        return []
    change = np.flatnonzero(labels[1:] != labels[:-1]) + 1
    starts = np.concatenate(([0], change))
    out = []
    for i, a in enumerate(starts):
        stop = int(steps[change[i]]) if i < len(change) else int(steps[-1]) + 1
        out.append((int(steps[a]), stop, bool(labels[a])))
    return out


def finish(labels: np.ndarray, fluct: np.ndarray, thr: np.ndarray, steps: np.ndarray, method: str, params: dict) -> StateResult:
    """Boundaries, model boundary and segments from labels [S, L]."""
    S, L = labels.shape
    bounds = np.full(L, -1, dtype=np.int64)
    for li in range(L):
        if labels[-1, li]:
            tr = np.flatnonzero(~labels[:, li])
            bounds[li] = steps[tr[-1] + 1] if len(tr) else steps[0]
    all_stable = labels.all(1)
    if all_stable[-1]:
        tr = np.flatnonzero(~all_stable)
        model_b = int(steps[tr[-1] + 1]) if len(tr) else int(steps[0])
    else:
        model_b = -1
    segs = [segments_of(labels[:, li], steps) for li in range(L)]
    return StateResult(labels, bounds, model_b, fluct, thr, segs, steps, method, dict(params))
