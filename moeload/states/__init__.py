"""Transient / stable phases of expert load (offline `detect` and `StreamingDetector`).

`detect(p, method="window")` labels every step of every MoE layer as transient (False) or stable
(True). Methods: "window" (rolling range/variance with thresholds and hysteresis, the paper's rule
made precise), "pelt" (change points of the fluctuation level, ruptures PELT), "test" (drift test
between consecutive windows). docs/metrics.md defines each rule and its defaults.
"""

from __future__ import annotations

from typing import Any

from moeload.errors import InputError
from moeload.states._input import load_input
from moeload.states.base import StateResult
from moeload.states.drift import DriftTest
from moeload.states.pelt import PeltRule
from moeload.states.streaming import StateEvent, StreamingDetector
from moeload.states.window import WindowRule

_METHODS = {"window": WindowRule, "pelt": PeltRule, "test": DriftTest}


def available() -> list[str]:
    """Names accepted by `detect(method=...)` and `get`."""
    return sorted(_METHODS)


def get(method: str, **params: Any) -> WindowRule | PeltRule | DriftTest:
    """A new detector for `method` with keyword hyperparameters `params` (unknown names ->
    InputError); their values are checked by its `fit()` / `detect`."""
    if method not in _METHODS:
        raise InputError(f"method: unknown state detector {method!r}; available: {available()}")
    try:
        return _METHODS[method](**params)
    except TypeError as exc:
        raise InputError(f"method={method!r}: bad parameter ({exc})") from None


def detect(p: Any, method: str = "window", *, steps: Any = None, tokens: Any = None, **params: Any) -> StateResult:
    """Label steps stable / transient.

    p: [S, L, E] proportions (rows sum to 1; all-NaN row = no tokens that step), integer counts
    [S, L, E], or a Trace (then step numbers, routed assignments and top-k come from it).
    steps: [S] step numbers for boundaries/segments (default: indices, or the trace's steps).
    tokens: [S] or [S, L] routed assignments per step (for reference="noise" with proportions).
    Returns a StateResult: labels [S, L], boundaries [L], model_boundary, fluctuation [S, L], ...
    """
    rule = get(method, **params).fit()  # bad hyperparameters are refused before the input is read
    return rule.detect(load_input(p, "p", steps=steps, tokens=tokens))


__all__ = ["StateEvent", "StateResult", "StreamingDetector", "available", "detect", "get"]
