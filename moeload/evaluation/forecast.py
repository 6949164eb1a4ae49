"""One forecast from a trace: fit a predictor on the proportions before an origin, forecast a horizon,
and keep the recorded steps after the origin for comparison (what `moeload predict` / `plan` and the
report's forecast figure show)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from moeload.errors import InputError


@dataclasses.dataclass
class TraceForecast:
    """forecast: [H, L, E] proportions; actual: [h, L, E] recorded proportions after the origin
    (h <= H, empty when the origin is the end of the trace); fit_steps: [T] steps fitted on;
    layers: [L] layer ids; actual_steps: [h]."""

    predictor: str
    params: dict[str, Any]
    layers: np.ndarray
    fit_steps: np.ndarray
    origin: int
    forecast: np.ndarray
    actual: np.ndarray
    actual_steps: np.ndarray


def forecast_trace(
    trace: Any,
    predictor: str,
    horizon: int,
    *,
    params: dict[str, Any] | None = None,
    at: int | None = None,
    layers: Sequence[int | str] | None = None,
    history: int | None = None,
) -> TraceForecast:
    """Fit `predictor` (a registered name, with `params`) on `trace`'s proportions of the recorded
    steps before `at` (default: all; the last `history` of them where given) and forecast `horizon`
    steps from there. InputError: unknown predictor or parameters, an empty trace, no step before
    `at`, or `at` past the end (the latest origin is the last step + 1)."""
    import moeload.predictors as predictors

    model = predictors.get(predictor, **(params or {}))
    lay = trace.layer_ids(layers)
    all_steps = trace.steps
    if len(all_steps) == 0:
        raise InputError(f"{trace.path}: the trace holds no training steps")
    first_step, last_step = int(all_steps[0]), int(all_steps[-1])
    if at is None:
        n_fit, origin = len(all_steps), last_step + 1
    else:
        n_fit, origin = int(np.searchsorted(all_steps, at, side="left")), int(at)
        if n_fit == 0:
            raise InputError(
                f"--at {at}: no recorded step before it in {trace.path} (trace steps {first_step}..{last_step})"
            )
        if at > last_step + 1:
            raise InputError(
                f"--at {at}: past the end of {trace.path} (trace steps {first_step}..{last_step}); the latest "
                f"origin is {last_step + 1}, the default"
            )
    first = 0 if history is None else max(0, n_fit - history)
    fit_steps = all_steps[first:n_fit]
    future_steps = all_steps[n_fit : n_fit + horizon]
    p = trace.proportions(all_steps[first : n_fit + len(future_steps)], list(lay))
    fc = model.fit(p[: len(fit_steps)]).predict(horizon)
    return TraceForecast(
        predictor, dict(params or {}), lay, fit_steps, origin, np.asarray(fc), p[len(fit_steps) :], future_steps
    )


__all__ = ["TraceForecast", "forecast_trace"]
