"""Rolling-origin backtests of load predictors, their summary and a printable table."""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from moeload.errors import InputError
from moeload.evaluation.metrics import METRICS, contiguous_map, error_metrics
from moeload.predictors.registry import from_spec, spec_label
from moeload.states._input import LoadInput, int_param, load_input


def _factory(spec: Any):
    """A zero-argument function giving a fresh, unfitted predictor for `spec` (checked now)."""
    from_spec(spec, "predictors")
    return lambda: from_spec(spec, "predictors")


def _origins(inp: LoadInput, origins: Any, every: int | None, min_history: int, hmin: int) -> np.ndarray:
    S = inp.p.shape[0]
    if origins is None:
        step = every if every is not None else max(1, hmin // 2)
        return np.arange(min_history, S - hmin + 1, int_param(step, "every"), dtype=np.int64)
    o = np.unique(np.asarray(origins, dtype=np.int64).reshape(-1))
    if inp.from_trace:
        idx = np.searchsorted(inp.steps, o)
        if (idx >= S).any() or (inp.steps[np.minimum(idx, S - 1)] != o).any():
            raise InputError(
                f"origins: {o[(idx >= S) | (inp.steps[np.minimum(idx, S - 1)] != o)][:5]} are not recorded steps"
            )
        o = idx
    if (o < 1).any() or (o >= S).any():
        raise InputError(f"origins: indices must lie in [1, {S - 1}], got {o.min()}..{o.max()}")
    return o


def _phase_labels(inp: LoadInput, phases: Any) -> np.ndarray | None:
    """[S, L] bool stable labels, or None for no split."""
    import moeload.states as states

    S, L, _ = inp.p.shape
    if phases is None:
        return states.get("window").detect(inp).labels
    if phases is False:
        return None
    if isinstance(phases, states.StateResult):
        phases = phases.labels
    lab = np.asarray(phases)
    if lab.dtype.kind in "US":
        lab = lab == "stable"
    lab = lab.astype(bool)
    if lab.ndim == 1:
        lab = np.repeat(lab[:, None], L, axis=1)
    if lab.shape != (S, L):
        raise InputError(f"phases: expected [steps] or [steps, layers] = [{S}, {L}], got {np.shape(phases)}")
    return lab


def backtest(
    p: Any,
    predictors: Sequence[Any] = ("last", "sw_avg", "ema"),
    horizons: Iterable[int] = (1000, 2000),
    origins: Any = None,
    every: int | None = None,
    min_history: int = 100,
    phases: Any = None,
    gpu_map: Any = None,
    steps: Any = None,
    num_gpus: int = 4,
    incremental: bool = True,
    progress: bool = False,
) -> pd.DataFrame:
    """Rolling-origin evaluation: at each origin o fit on p[:o], forecast H steps, compare with p[o:o+H].

    p: [S, L, E] proportions, integer counts or a Trace. predictors: specs of
    `predictors.from_spec` (names, (name, kwargs) pairs, Predictor instances copied unfitted). origins: step numbers (Trace or steps= given) or indices;
    default every `every` steps (default min(horizons) // 2) from min_history on. Origin/horizon
    pairs that run past the trace are skipped and counted in df.attrs["origins_used"/"origins_skipped"].
    phases: None = `states.detect` window labels at step o - 1; a StateResult or [S] / [S, L] bool or
    "stable"/"transient" strings; False = no split ("all"). gpu_map: [E] or [L, E] expert -> GPU for
    maxload_err (default: the trace's recorded map, else contiguous over num_gpus); -1 marks a
    padding column (a layer with fewer experts), left out of every metric. incremental:
    fit once, then `update` with the steps between origins (same forecasts for last/sw_avg/ema,
    much faster); False refits from scratch at every origin.
    Returns one row per predictor x horizon x origin x layer: predictor, horizon, origin (step),
    layer, phase, mae_pp, rmse_pp, mre, havg_mae_pp, maxload_err, n_eval, fit_s.
    """
    inp = load_input(p, "p", steps=steps)
    S, L, E = inp.p.shape
    hs = sorted({int_param(h, "horizons") for h in horizons})
    if not hs:
        raise InputError("horizons: give at least one horizon")
    if not predictors:
        raise InputError("predictors: give at least one predictor")
    min_history = int_param(min_history, "min_history")
    org = _origins(inp, origins, every, min_history, hs[0])
    labels = _phase_labels(inp, phases)
    if gpu_map is None:
        gmap = (
            inp.gpu_map if inp.gpu_map is not None else contiguous_map(inp.experts, E, int_param(num_gpus, "num_gpus"))
        )
    else:
        gmap = np.asarray(gpu_map, dtype=np.int64)
        if gmap.ndim == 1 and gmap.shape == (E,):
            gmap = np.broadcast_to(gmap, (L, E))
        if gmap.shape != (L, E) or (gmap < -1).any() or (gmap.max(-1) < 0).any():
            raise InputError(
                f"gpu_map: expected GPU ids [E] or [L, E] = [{L}, {E}] (-1 = padding column), got {np.shape(gpu_map)}"
            )
    used = {h: int(((org + h) <= S).sum()) for h in hs}
    rows: list[dict[str, Any]] = []
    specs = [(spec_label(s), _factory(s)) for s in predictors]
    bar = _progress(progress, len(specs) * len(org))
    for label, make in specs:
        pred, last_o = None, 0
        for o in org:
            h_ok = [h for h in hs if o + h <= S]
            if bar is not None:
                bar[0].advance(bar[1])
            if not h_ok:
                continue
            t0 = time.perf_counter()
            if pred is None or not incremental:
                pred = make().fit(inp.p[:o])
            else:
                pred.update(inp.p[last_o:o])
            last_o = o
            fc = pred.predict(h_ok[-1])
            fit_s = time.perf_counter() - t0
            phase = (
                np.full(L, "all", dtype=object) if labels is None else np.where(labels[o - 1], "stable", "transient")
            )
            for h in h_ok:
                m = error_metrics(fc[:h], inp.p[o : o + h], inp.experts, gmap)
                for li in range(L):
                    row = {
                        "predictor": label,
                        "horizon": h,
                        "origin": int(inp.steps[o]),
                        "layer": li,
                        "phase": phase[li],
                    }
                    row.update({k: float(m[k][li]) for k in METRICS})
                    row["n_eval"] = int(m["n_eval"][li])
                    row["fit_s"] = fit_s
                    rows.append(row)
    if bar is not None:
        bar[0].stop()
    cols = ["predictor", "horizon", "origin", "layer", "phase", *METRICS, "n_eval", "fit_s"]
    df = pd.DataFrame(rows, columns=cols)
    df.attrs["origins_used"] = used
    df.attrs["origins_skipped"] = {h: int(len(org) - used[h]) for h in hs}
    df.attrs["notes"] = [
        f"horizon {h}: {len(org) - used[h]} of {len(org)} origins skipped (run past step {int(inp.steps[-1])})"
        for h in hs
        if used[h] < len(org)
    ]
    for h in hs:
        if used[h] == 0:
            warnings.warn(
                f"backtest: horizon {h} is longer than the trace after every origin ({S} steps); no rows for it",
                stacklevel=2,
            )
    return df


def _progress(on: bool, total: int):
    if not on:
        return None
    from rich.progress import Progress

    prog = Progress(transient=True)
    prog.start()
    return prog, prog.add_task("backtest", total=total)


def summarize(df: pd.DataFrame, baseline: str = "sw_avg") -> pd.DataFrame:
    """Mean of every metric per predictor x horizon x phase (plus phase "all"), n_origins used,
    and `<metric>_vs_<baseline>` = mean / the baseline's mean at the same horizon and phase."""
    if df.empty:
        raise InputError("df: the backtest produced no rows (horizons longer than the trace?)")
    parts = [df]
    if set(df["phase"]) != {"all"}:
        parts.append(df.assign(phase="all"))
    d = pd.concat(parts, ignore_index=True)
    g = d.groupby(["predictor", "horizon", "phase"], sort=True)
    out = g[list(METRICS)].mean()
    out["n_origins"] = g["origin"].nunique()
    out["n_rows"] = g.size()
    out = out.reset_index()
    if baseline in set(out["predictor"]):
        base = out[out["predictor"] == baseline].set_index(["horizon", "phase"])[list(METRICS)]
        key = pd.MultiIndex.from_frame(out[["horizon", "phase"]])
        for m in METRICS:
            with np.errstate(invalid="ignore", divide="ignore"):
                out[f"{m}_vs_{baseline}"] = out[m].to_numpy() / base[m].reindex(key).to_numpy()
    return out


def format_table(df: pd.DataFrame, baseline: str = "sw_avg", style: str = "plain") -> str:
    """Printable summary table (runs `summarize` on raw backtest rows). style: "plain" | "rich"."""
    s = summarize(df, baseline) if "origin" in df.columns else df
    cols = ["predictor", "horizon", "phase", "n_origins", "havg_mae_pp", "mae_pp", "rmse_pp", "mre", "maxload_err"]
    rel = f"havg_mae_pp_vs_{baseline}"
    if rel in s.columns:
        cols.append(rel)
    s = s[cols]
    if style == "plain":
        return s.to_string(index=False, float_format=lambda v: f"{v:.4g}")
    if style != "rich":
        raise InputError(f"style: expected 'plain' or 'rich', got {style!r}")
    from rich.console import Console
    from rich.table import Table

    t = Table(*cols)
    for r in s.itertuples(index=False):
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r])
    con = Console(record=True, width=160, file=io.StringIO())
    con.print(t)
    return con.export_text()
