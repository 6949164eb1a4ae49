"""Replay a trace: re-plan every K steps from a forecast and measure the realised imbalance.

At step t0 = 0, K, 2K, ... the loads of the next K steps are forecast from the last `window`
steps (a `moeload.predictors` predictor on proportions, averaged over the horizon), a placement is
planned, and each of the next K steps is scored by its per-layer max / mean GPU load under that
placement (each step's slowest GPU sets its time). Step 0 has no history and plans for uniform
loads; `oracle=True` plans for the true mean counts of the coming K steps instead. Policies that
accept per-step `samples` (balanced) get the history window (the coming steps for the oracle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from moeload.errors import InputError
from moeload.placement._placement import Placement, imbalance_of
from moeload.placement._registry import options, plan


@dataclass
class ReplayResult:
    """Outcome of `replay`.

    step_imbalance: [S, L] realised max / mean GPU load of every step and layer.
    replans: one row per re-plan: start, stop, moves (slots whose unit changed, all layers),
        planned (imbalance the plan expected), realised (mean of step_imbalance over the segment),
        segment (max / mean of the segment's summed loads).
    """

    step_imbalance: np.ndarray
    replans: pd.DataFrame
    config: dict = field(default_factory=dict)

    @property
    def imbalance(self) -> float:
        """Mean over steps and layers of the per-step max / mean GPU load."""
        return float(np.nanmean(self.step_imbalance))

    def summary(self) -> dict[str, Any]:
        """One row of numbers for comparison tables."""
        per_step = self.step_imbalance.mean(axis=1)
        moved = self.replans["moves"].iloc[1:]
        return {
            "imbalance": self.imbalance,
            "imbalance_p95": float(np.nanpercentile(per_step, 95)),
            "segment_imbalance": float(self.replans["segment"].mean()),
            "replans": int(len(self.replans)),
            "moves_per_replan": float(moved.mean()) if len(moved) else 0.0,
        }


def _forecast(history: np.ndarray, horizon: int, predictor: str, kwargs: dict) -> np.ndarray:
    """`history: [T, L, E]` counts -> `[L, E]` forecast mean proportions of the next `horizon` steps."""
    import moeload.predictors as predictors

    total = history.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(total > 0, history / np.where(total > 0, total, 1), np.nan)
    return predictors.get(predictor, **kwargs).fit(p).predict(horizon).mean(axis=0)


def replay(
    counts: np.ndarray,
    num_gpus: int,
    num_replicas: int | None = None,
    policy: str = "eplb",
    predictor: str = "sw_avg",
    predictor_kwargs: dict | None = None,
    replan_every: int = 100,
    window: int | None = None,
    oracle: bool = False,
    policy_kwargs: dict | None = None,
) -> ReplayResult:
    """Replay `counts: [S, L, E]` (per-step expert counts) under periodic re-planning.

    window: steps of history given to the predictor (default: all so far).
    Returns a `ReplayResult`; `result.summary()` gives the headline numbers.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 3 or counts.shape[0] < 1:
        raise InputError(f"counts: expected shape [S, L, E] with S >= 1, got {counts.shape}")
    if not isinstance(replan_every, (int, np.integer)) or replan_every < 1:
        raise InputError(f"replan_every: expected a positive integer, got {replan_every!r}")
    if window is not None and (not isinstance(window, (int, np.integer)) or window < 1):
        raise InputError(f"window: expected a positive integer or None, got {window!r}")
    num_steps, num_layers, num_experts = counts.shape
    predictor_kwargs = dict(predictor_kwargs or {})
    policy_kwargs = dict(policy_kwargs or {})
    step_imbalance = np.empty((num_steps, num_layers))
    rows = []
    previous: Placement | None = None
    use_samples = "samples" in options(policy) and "samples" not in policy_kwargs
    for start in range(0, num_steps, replan_every):
        stop = min(start + replan_every, num_steps)
        extra = {}
        if oracle:
            weight = counts[start:stop].sum(axis=0)
            extra = {"samples": counts[start:stop]} if use_samples else {}
        elif start == 0:
            weight = np.ones((num_layers, num_experts))
        else:
            history = counts[max(0, start - window) if window else 0 : start]
            weight = _forecast(history, stop - start, predictor, predictor_kwargs)
            extra = {"samples": history} if use_samples else {}
        pl = plan(weight, num_gpus, num_replicas, policy, **policy_kwargs, **extra)
        realised = pl.evaluate(counts[start:stop])
        step_imbalance[start:stop] = realised.imbalance
        rows.append(
            {
                "start": start,
                "stop": stop,
                "moves": int(pl.moves_from(previous).sum()) if previous is not None else 0,
                "planned": float(pl.imbalance.mean()),
                "realised": float(realised.imbalance.mean()),
                "segment": float(imbalance_of(realised.gpu_load.sum(axis=0)).mean()),
            }
        )
        previous = pl
    config = {
        "num_gpus": num_gpus,
        "num_replicas": num_replicas or num_experts,
        "policy": policy,
        "predictor": "oracle" if oracle else predictor,
        "predictor_kwargs": predictor_kwargs,
        "replan_every": int(replan_every),
        "window": window,
        "policy_kwargs": policy_kwargs,
    }
    return ReplayResult(step_imbalance, pd.DataFrame(rows), config)


DEFAULT_CANDIDATES: tuple[tuple[str, dict], ...] = (
    ("last", {}),
    ("sw_avg", {"window": 100, "slide": False}),
    ("ema", {}),
)


def compare(
    counts: np.ndarray,
    num_gpus: int,
    num_replicas: int,
    *,
    replan_every: int = 100,
    window: int = 1000,
    candidates: tuple[tuple[str, dict], ...] = DEFAULT_CANDIDATES,
    policies: tuple[str, ...] = ("eplb", "balanced"),
    vllm_window: int = 1000,
    vllm_replan_every: int = 3000,
) -> pd.DataFrame:
    """Table of realised imbalance on `counts: [S, L, E]` for the standard scenarios.

    Rows: static contiguous (no replicas); EPLB with a moving average at vLLM's defaults (window
    1000, re-plan every 3000 steps); each of `policies` with each candidate predictor, re-planned
    every `replan_every` steps (the lowest realised imbalance is flagged `best_forecast`); each of
    `policies` with the oracle (future mean loads). Every forecast scenario starts from a plan for
    uniform loads at step 0, so a trace shorter than `vllm_replan_every` steps shows the vLLM row
    without any load-informed plan.
    """
    num_experts = counts.shape[2]
    scenarios: list[tuple[str, dict]] = []
    if num_experts % num_gpus == 0:
        scenarios.append(
            ("static contiguous", dict(policy="contiguous", num_replicas=num_experts, replan_every=counts.shape[0]))
        )
    scenarios.append(
        (
            "EPLB + moving average (vLLM defaults)",
            dict(
                policy="eplb",
                predictor="sw_avg",
                predictor_kwargs={"window": vllm_window, "slide": False},
                window=vllm_window,
                replan_every=vllm_replan_every,
            ),
        )
    )
    for policy in policies:
        for name, kwargs in candidates:
            scenarios.append(
                (
                    f"{policy} + {name}",
                    dict(
                        policy=policy, predictor=name, predictor_kwargs=kwargs, window=window, replan_every=replan_every
                    ),
                )
            )
    for policy in policies:
        scenarios.append((f"{policy} + oracle", dict(policy=policy, oracle=True, replan_every=replan_every)))
    rows = []
    for label, kw in scenarios:
        kw.setdefault("num_replicas", num_replicas)
        result = replay(counts, num_gpus, **kw)
        row = {k: result.config[k] for k in ("policy", "predictor", "replan_every", "num_replicas")}
        if row["policy"] == "contiguous":
            row["predictor"] = "-"
        rows.append({"scenario": label, **row, **result.summary()})
    table = pd.DataFrame(rows)
    forecast = table["policy"].isin(policies) & (table["predictor"] != "oracle")
    forecast &= table["replan_every"] == replan_every
    table["best_forecast"] = False
    if forecast.any():
        table.loc[table.loc[forecast, "imbalance"].idxmin(), "best_forecast"] = True
    return table
