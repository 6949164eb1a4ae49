"""Detector base class, result object, the hysteresis state machine and run-length segments shared
by all detectors."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, TypeVar

import numpy as np

from moeload._estimator import Estimator

# Per-step evidence codes fed to the state machine.
UNKNOWN, ENTER, BETWEEN, EXIT = -1, 0, 1, 2


D = TypeVar("D", bound="Detector")


class Detector(Estimator):
    """A state detector (the estimator protocol of `moeload._estimator`).

    `__init__` takes keyword-only hyperparameters and stores them unchanged (`get_params` /
    `set_params`); `fit()` validates them (InputError naming the bad one) and resolves their
    defaults into `params_` (what `StateResult.params` records) and one `<name>_` attribute per
    hyperparameter, which the rule's methods read; `detect(inp)` calls `fit()` before any work.
    """

    name: str = ""
    params_: dict[str, Any]  # resolved hyperparameters, set by `fit`

    def fit(self: D) -> D:
        """Validate the hyperparameters and resolve their defaults (no data needed). Returns self."""
        self.params_ = self._resolve()
        for key, value in self.params_.items():
            setattr(self, key + "_", value)
        return self

    def _resolve(self) -> dict[str, Any]:
        """{name: validated value, defaults resolved} for every hyperparameter, in signature order."""
        raise NotImplementedError


@dataclasses.dataclass
class StateResult:
    """What `states.detect` returns.

    labels: [S, L] bool, True = stable. boundaries: [L] first step of the final stable phase
    (-1 if the layer ends transient). model_boundary: first step from which every layer stays
    stable to the end (-1 if none). fluctuation: [S, L] the statistic the rule thresholds (NaN
    where undefined). threshold: [S, L] the entry threshold it was compared with (NaN where the
    method has none). segments: per layer, list of (start, stop, stable) runs, stop exclusive.
    steps: [S] step numbers used in boundaries and segments (indices unless given a Trace or steps).
    verdicts: [L] "stable from step N" or "not stable yet" (a final stable phase that is not
    confirmed, see `confirmed_end`, gives boundary -1 and "not stable yet"). model_verdict: the same
    for the whole model.
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
    verdicts: list[str] = dataclasses.field(default_factory=list)
    model_verdict: str = ""

    def summary(self) -> str:
        """A few lines: boundary and stable share per layer."""
        lines = [f"method={self.method} model_boundary={self.model_boundary} ({self.model_verdict})"]
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


def verdict(boundary: int) -> str:
    """The phrase for one boundary: "stable from step N" or "not stable yet" (boundary -1)."""
    return f"stable from step {int(boundary)}" if boundary >= 0 else "not stable yet"


def confirmed_end(
    run_len: np.ndarray, fluct: np.ndarray, thr: np.ndarray, confirm: int, min_under: float, max_decline: float
) -> np.ndarray:
    """[L] bool: the final stable phase is confirmed.

    run_len: [L] steps in the final stable run (0 if the layer ends transient); fluct, thr: [C', L]
    the statistic and entry threshold of the last C' >= confirm steps fed (NaN = undefined).
    Confirmed when run_len >= confirm and, over the last `confirm` steps: the statistic is <= the
    threshold at >= min_under of the steps where both are defined, and the median of the statistic
    over the later half is >= (1 - max_decline) x the median over the earlier half (it no longer falls).
    confirm = 0 confirms every layer that ends stable.
    """
    ok = np.asarray(run_len) >= max(confirm, 1)
    if confirm == 0 or len(fluct) < confirm:
        return ok if confirm == 0 else np.zeros_like(ok)
    f, t = fluct[len(fluct) - confirm :], thr[len(thr) - confirm :]
    h = confirm // 2
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        both = ~np.isnan(f) & ~np.isnan(t)
        under = np.where(both.any(0), (both & (f <= t)).sum(0) / np.maximum(both.sum(0), 1), 1.0)
        early, late = np.nanmedian(f[:h], 0), np.nanmedian(f[h:], 0)
    falling = late < (1 - max_decline) * early  # False where NaN
    return ok & (under >= min_under) & ~falling


def finish(
    labels: np.ndarray,
    fluct: np.ndarray,
    thr: np.ndarray,
    steps: np.ndarray,
    method: str,
    params: dict,
    confirmed: np.ndarray | None = None,
) -> StateResult:
    """Boundaries, model boundary, verdicts and segments from labels [S, L]. confirmed: [L] bool from
    `confirmed_end` (None = every layer that ends stable counts as stable)."""
    S, L = labels.shape
    bounds = np.full(L, -1, dtype=np.int64)
    for li in range(L):
        if labels[-1, li] and (confirmed is None or confirmed[li]):
            tr = np.flatnonzero(~labels[:, li])
            bounds[li] = steps[tr[-1] + 1] if len(tr) else steps[0]
    all_stable = np.all(labels, axis=1)  # [S]
    if all_stable[-1] and (bounds >= 0).all():
        tr = np.flatnonzero(~all_stable)
        model_b = int(steps[tr[-1] + 1]) if len(tr) else int(steps[0])
    else:
        model_b = -1
    segs = [segments_of(labels[:, li], steps) for li in range(L)]
    return StateResult(
        labels,
        bounds,
        model_b,
        fluct,
        thr,
        segs,
        steps,
        method,
        dict(params),
        [verdict(int(b)) for b in bounds],
        verdict(model_b),
    )


def final_run_length(labels: np.ndarray) -> np.ndarray:
    """[L] rows in the final stable run of labels [S, L] (0 where the last label is transient)."""
    S, L = labels.shape
    out = np.zeros(L, dtype=np.int64)
    for li in range(L):
        tr = np.flatnonzero(~labels[:, li])
        out[li] = S - (tr[-1] + 1) if len(tr) else S
    return out
