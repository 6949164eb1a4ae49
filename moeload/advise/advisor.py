"""`advise`: replay a trace through every strategy and say what each would save, and what to do."""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeload.advise.cost import Calibration, ExpertShape, default_calibration
from moeload.advise.strategies import STRATEGIES, Outcome, Setting, build, rechunk, run_all
from moeload.errors import InputError

FORECAST_INTERVALS = (100, 250, 500, 1000)
"""Re-plan intervals `forecast` chooses from, on the first half of the trace."""
MIN_SAVING_PCT = 1.0
"""Below this predicted saving (or when its interval reaches 0) the advice is to leave it alone."""
DEFAULT_SHAPE = ExpertShape(hidden=4096, ffn_hidden=14336, gated=True, source="default (Mixtral-8x7B expert)")


@dataclass
class Advice:
    """Outcome of `advise`.

    table: one row per strategy (columns: name, step_ms, saving_pct, saving_lo, saving_hi,
        replans, moved_experts, moved_bytes, extra_memory_bytes, migration_ms).
    recommended / reason: the strategy to use and why. calibration: "measured" or "default".
    """

    table: Any
    recommended: str
    reason: str
    calibration: str
    setting: Setting
    outcomes: dict[str, Outcome]
    steps: int
    last_window: np.ndarray
    """[L, E] mean routes per step of the trace's last `eplb_window` steps (what artifacts plan for)."""
    info: dict = field(default_factory=dict)

    def to_jsonable(self) -> dict:
        rows = []
        for r in self.table.to_dict("records"):
            rows.append(
                {
                    "name": r["name"],
                    "step_ms": r["step_ms"],
                    "saving_pct": r["saving_pct"],
                    "saving_interval": [r["saving_lo"], r["saving_hi"]],
                    "moved_experts": int(r["moved_experts"]),
                    "moved_bytes": int(r["moved_bytes"]),
                    "extra_memory_bytes": int(r["extra_memory_bytes"]),
                }
            )
        return {
            "strategies": rows,
            "recommended": self.recommended,
            "reason": self.reason,
            "calibration": self.calibration,
            **{k: v for k, v in self.info.items() if k not in ("strategies",)},
        }


def _extra(meta: dict) -> dict:
    extra = meta.get("extra") or {}
    if isinstance(extra, str):  # older writers stored repr(dict)
        try:
            extra = ast.literal_eval(extra)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return {}
    return extra if isinstance(extra, dict) else {}


def _workload_configs() -> dict:
    """`moeload.workloads.configs.CONFIGS` without importing the `moeload.workloads` package.

    The package imports torch (its model); its configs module is plain dataclasses, loaded here
    from its file so that `moeload advise` stays a NumPy-only, seconds-long command.
    """
    import sys

    mod = sys.modules.get("moeload.workloads.configs")
    if mod is None:
        import importlib.util
        from pathlib import Path

        path = Path(__file__).resolve().parent.parent / "workloads" / "configs.py"
        spec = importlib.util.spec_from_file_location("moeload._advise_workload_configs", path)
        if spec is None or spec.loader is None:
            return {}
        mod = sys.modules.get(spec.name) or importlib.util.module_from_spec(spec)
        if spec.name not in sys.modules:
            sys.modules[spec.name] = mod  # dataclasses look their module up while building the class
            spec.loader.exec_module(mod)
    return mod.CONFIGS


def resolve_shape(
    meta: dict,
    hidden: int | None = None,
    ffn_hidden: int | None = None,
    gated: bool | None = None,
) -> ExpertShape:
    """The expert shape: given sizes win; else the embedded workload the manifest names; else a default."""
    if hidden is not None or ffn_hidden is not None:
        if hidden is None or ffn_hidden is None:
            raise InputError("--hidden and --ffn-hidden go together (the expert's input and inner width)")
        return ExpertShape(int(hidden), int(ffn_hidden), bool(gated), source="given")
    CONFIGS = _workload_configs()
    extra = _extra(meta)
    cfg = extra.get("config")
    workload = cfg.get("workload") if isinstance(cfg, dict) else None
    workload = workload if isinstance(workload, dict) else {}  # the run's own overrides of its base config
    model = str(meta.get("model_name") or "").split(" ")[0]  # e.g. "gpt3-small-moe (...)", "moeload-workload/cpu-demo"
    names = [workload.get("base"), extra.get("experiment"), extra.get("workload"), model, model.rsplit("/", 1)[-1]]
    for name in names:
        if isinstance(name, str) and name in CONFIGS:
            c = CONFIGS[name]
            width = workload.get("expert_d_ff", c.expert_d_ff or c.d_ff or 4 * c.d_model)
            return ExpertShape(c.d_model, int(width), bool(gated), source=f"workload {name}")
    return DEFAULT_SHAPE


def _bootstrap_saving(
    base: np.ndarray, other: np.ndarray, block: int = 100, n: int = 200, seed: int = 0
) -> tuple[float, float]:
    """95 % interval of `100 * (1 - mean(other) / mean(base))` by a moving-block bootstrap over steps."""
    S = base.shape[0]
    if S < 2 * block:
        block = max(1, S // 4)
    nb = max(1, S // block)
    starts = np.arange(0, nb * block, block)
    bsum = np.add.reduceat(base[: nb * block], starts)
    osum = np.add.reduceat(other[: nb * block], starts)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, nb, size=(n, nb))
    b, o = bsum[pick].sum(axis=1), osum[pick].sum(axis=1)
    saving = 100.0 * (1.0 - o / np.where(b > 0, b, 1.0))
    return float(np.percentile(saving, 2.5)), float(np.percentile(saving, 97.5))


def advise(
    trace,
    num_gpus: int = 8,
    *,
    num_nodes: int = 1,
    num_replicas: int | None = None,
    calibration: str | Path | Calibration | None = None,
    shape: ExpertShape | None = None,
    micro_batches: int = 1,
    other_ms: float = 0.0,
    copies_per_gpu: int = 1,
    eplb_window: int = 1000,
    eplb_interval: int = 3000,
    chunk: int = 1000,
    progress: Callable[[int, int], None] | None = None,
) -> Advice:
    """Replay `trace` (a `Trace`, or counts `[S, L, E]`) through `STRATEGIES`; see the module docs."""
    import pandas as pd

    if isinstance(trace, np.ndarray):
        counts = np.asarray(trace)
        if counts.ndim != 3:
            raise InputError(f"counts: expected [steps, layers, experts], got shape {counts.shape}")
        S, L, E = counts.shape
        meta: dict = {}

        def blocks():
            for i in range(0, S, chunk):
                yield counts[i : i + chunk]
    else:
        meta = trace.meta
        S, L, E = len(trace.steps), len(trace.layers), int(max(trace.experts_per_layer))

        def blocks():
            for _, c in trace.iter_blocks(block=chunk):
                yield c

    if S < 2:
        raise InputError(f"trace has {S} step(s); advice needs at least 2")
    shape = shape or resolve_shape(meta)
    G = int(num_gpus)
    if isinstance(calibration, Calibration):
        cal = calibration
    elif calibration is not None:
        cal = Calibration.load(calibration)
    else:
        cal = default_calibration(shape, max(1, (num_replicas or E) // max(G, 1)))
    setting = Setting(
        G, E, L, shape, cal, num_nodes=int(num_nodes), num_replicas=num_replicas, micro_batches=int(micro_batches)
    )
    intervals = [k for k in FORECAST_INTERVALS if k < S // 2] or [max(1, S // 4)]
    tail: list[np.ndarray] = []

    totals = np.zeros(L)  # [L] routes over the whole trace: a layer that never routed is flagged

    def chunks():
        for c in rechunk(blocks(), chunk):
            totals[:] += np.asarray(c, dtype=np.float64).sum(axis=(0, 2))
            tail.append(c)
            while sum(x.shape[0] for x in tail) - tail[0].shape[0] >= eplb_window:
                tail.pop(0)
            yield c

    # One pass: every strategy, and the forecast strategy at each candidate interval.
    fixed = [
        build(n, setting, eplb_window=eplb_window, eplb_interval=eplb_interval, copies_per_gpu=copies_per_gpu)
        for n in STRATEGIES
        if n != "forecast"
    ]
    fc = [build("forecast", setting, forecast_interval=k, forecast_window=min(200, 2 * k)) for k in intervals]
    done = run_all(chunks(), fixed + fc, setting, None if progress is None else (lambda t: progress(t, S)))
    outs: dict[str, Outcome] = {o.name: o for o in done[: len(fixed)]}
    half = max(1, S // 2)
    fouts = done[len(fixed) :]
    best = int(np.argmin([o.step_s[:half].mean() for o in fouts]))
    fo = fouts[best]
    fo.notes = {
        "interval": intervals[best],
        "chosen_on": f"steps 0..{half - 1}",
        "candidates": {k: float(o.step_s[:half].mean() * 1e3) for k, o in zip(intervals, fouts)},
    }
    outs["forecast"] = fo
    outs = {n: outs[n] for n in STRATEGIES}

    base = outs["none"].step_s
    other_s = other_ms / 1e3
    rows = []
    for name, o in outs.items():
        mean = float(o.step_s.mean()) + other_s
        saving = 100.0 * (1.0 - mean / (float(base.mean()) + other_s))
        lo, hi = _bootstrap_saving(base + other_s, o.step_s + other_s) if name != "none" else (0.0, 0.0)
        err = cal.rel_error * abs(saving)
        rows.append(
            {
                "name": name,
                "step_ms": mean * 1e3,
                "saving_pct": saving,
                "saving_lo": lo - err,
                "saving_hi": hi + err,
                "replans": o.replans,
                "moved_experts": o.moved_experts,
                "moved_bytes": o.moved_bytes,
                "extra_memory_bytes": o.extra_memory_bytes,
                "migration_ms": o.migration_s * 1e3,
            }
        )
    table = pd.DataFrame(rows)
    recommended, reason = _recommend(table, outs)
    last = np.concatenate(tail)[-eplb_window:].mean(axis=0) if tail else np.zeros((L, E))
    info = {
        "steps": S,
        "layers": L,
        "experts": E,
        "gpus": G,
        "nodes": int(num_nodes),
        "replicas": setting.num_replicas,
        "micro_batches": int(micro_batches),
        "shape": {"hidden": shape.hidden, "ffn_hidden": shape.ffn_hidden, "gated": shape.gated, "source": shape.source},
        "calibration_device": cal.device,
        "all_to_all": "measured" if cal.a2a_measured else "default",
        "forecast_interval": fo.notes["interval"],
        "other_ms": other_ms,
        "zero_layers": [int(i) for i in np.flatnonzero(totals == 0)],
        "disabled_layers": sorted(_extra(meta).get("disabled_layers") or {}),
    }
    _warn_unreliable(info)
    return Advice(table, recommended, reason, cal.kind, setting, outs, S, last, info)


def _warn_unreliable(info: dict) -> None:
    """Layers whose counts cannot be trusted make every time above them suspect: say so."""
    import warnings

    if info["zero_layers"]:
        warnings.warn(
            f"advise: layer(s) {info['zero_layers']} received no token in the whole trace; their times "
            "are latency only (check the trace with `moeload check`)",
            RuntimeWarning,
            stacklevel=3,
        )
    if info["disabled_layers"]:
        warnings.warn(
            f"advise: the tracer disabled {len(info['disabled_layers'])} layer(s) "
            f"({', '.join(map(str, info['disabled_layers'][:3]))}); their counts stop where they were "
            "disabled, so the advice under-counts them",
            RuntimeWarning,
            stacklevel=3,
        )


def _recommend(table, outs: dict[str, Outcome]) -> tuple[str, str]:
    cands = table[~table["name"].isin(["none", "oracle"])].sort_values("step_ms")
    floor = float(table.loc[table["name"] == "oracle", "saving_pct"].iloc[0])
    if cands.empty:
        return "none", "no strategy to compare"
    best = cands.iloc[0]
    if best["saving_pct"] < MIN_SAVING_PCT or best["saving_lo"] <= 0:
        return "none", (
            f"the best strategy ({best['name']}) would save {best['saving_pct']:.1f} % "
            f"(interval {best['saving_lo']:.1f} .. {best['saving_hi']:.1f} %), below {MIN_SAVING_PCT:g} % "
            f"or not clear of zero; even a perfect balancer saves only {floor:.1f} %"
        )
    why = (
        f"{best['name']} saves {best['saving_pct']:.1f} % (interval {best['saving_lo']:.1f} .. "
        f"{best['saving_hi']:.1f} %) of the MoE layers' time; a perfect balancer would save {floor:.1f} %"
    )
    if best["name"] == "reactive":
        why += "; it needs a framework that duplicates experts per micro-batch (LLEP / UltraEP-style)"
    return str(best["name"]), why
