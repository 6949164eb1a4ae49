"""Policies by name and the public entry point `plan`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

from moeload.errors import InputError
from moeload.placement._placement import Placement, check_sizes, check_weight
from moeload.placement.balanced import plan_balanced
from moeload.placement.contiguous import plan_contiguous
from moeload.placement.eplb import plan_eplb
from moeload.placement.exact import plan_exact
from moeload.placement.fair_copying import plan_fair_copying

_POLICIES: dict[str, Callable[..., Placement]] = {
    "contiguous": plan_contiguous,
    "eplb": plan_eplb,
    "fair_copying": plan_fair_copying,
    "exact": plan_exact,
    "balanced": plan_balanced,
}


def available() -> list[str]:
    """Names accepted by `plan(..., policy=...)`."""
    return sorted(_POLICIES)


def options(policy: str) -> list[str]:
    """Keyword options that `policy` accepts."""
    if policy not in _POLICIES:
        raise InputError(f"policy: unknown {policy!r}; available: {', '.join(available())}")
    return [p.name for p in inspect.signature(_POLICIES[policy]).parameters.values() if p.kind is p.KEYWORD_ONLY]


def plan(
    weight: np.ndarray,
    num_gpus: int = 8,
    num_replicas: int | None = None,
    policy: str = "eplb",
    **opts: Any,
) -> Placement:
    """Place units with loads `weight: [L, E]` (or `[E]`, one layer) onto `num_gpus` GPUs.

    num_replicas: physical slots per layer (default E, no replicas); a multiple of num_gpus and
    at least E; slot s lives on GPU `s // (num_replicas // num_gpus)`.
    policy: one of `available()`; `opts` are that policy's keyword options (e.g. eplb's
    `num_groups`, `num_nodes`; exact's `split`, `time_limit`; balanced's `split`).
    """
    allowed = options(policy)
    w = check_weight(weight)
    num_replicas = w.shape[1] if num_replicas is None else num_replicas
    check_sizes(w.shape[1], num_gpus, num_replicas)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise InputError(f"policy {policy!r}: unknown option(s) {unknown}; it accepts {allowed}")
    return _POLICIES[policy](w, int(num_gpus), int(num_replicas), **opts)
