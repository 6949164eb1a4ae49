"""Figures of forecasts: one forecast against what happened, and backtest errors per predictor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from moeload.errors import InputError
from moeload.plots import _common as c

if TYPE_CHECKING:
    from matplotlib.axes import Axes

METRIC_LABELS = {
    "havg_mae_pp": "error of the horizon-average share (pp)",
    "mae_pp": "mean absolute error (pp)",
    "rmse_pp": "root mean squared error (pp)",
    "mre": "mean relative error",
    "maxload_err": "relative error of the busiest GPU's load",
}


def _one_layer(x: Any, name: str, layer: int) -> np.ndarray | None:
    if x is None:
        return None
    a = c.array(x, name, (2, 3))
    if a.ndim == 3:
        if not -a.shape[1] <= layer < a.shape[1]:
            raise InputError(f"layer={layer}: {name} has {a.shape[1]} layers")
        a = a[:, layer]
    return a * 100


def forecast_vs_actual(
    history: Any,
    forecast: Any,
    actual: Any = None,
    experts: Sequence[int] | None = None,
    ax: Any = None,
    *,
    band: Any = None,
    layer: int = 0,
    layer_name: str | None = None,
    start: int = 0,
    context: int | None = None,
    max_experts: int = 4,
    max_points: int = c.MAX_POINTS,
) -> Axes:
    """A forecast of expert shares continuing their history, against what happened.

    history: [T, E] proportions up to the forecast origin; forecast: [H, E]; actual: [H, E] or
    None ([.., L, E] arrays: pick `layer`). layer_name: how the title names the layer (default
    "layer {layer}" for [.., L, E] inputs; none for [T, E] inputs, which do not say). Row i of history is step start + i; the forecast
    covers steps start + T .. start + T + H - 1. experts: which to draw (default: the
    `max_experts` with the largest forecast share). context: history steps shown before the
    origin (default min(T, 3 H)). With `actual`, the shaded band is the error between forecast and
    actual; without it, `band` ([H, E] or [E] half-widths as proportions, e.g. a backtest's MAE
    per expert) shades forecast ± band. Returns the Axes.
    """
    h = _one_layer(history, "forecast_vs_actual: history", layer)
    f = _one_layer(forecast, "forecast_vs_actual: forecast", layer)
    y = _one_layer(actual, "forecast_vs_actual: actual", layer)
    if h is None or f is None:
        raise InputError("forecast_vs_actual: history and forecast are required, got None")
    T, E = h.shape
    H = len(f)
    if f.shape[1] != E or (y is not None and y.shape != f.shape):
        raise InputError(
            f"forecast_vs_actual: history has {E} experts, forecast {f.shape}"
            + ("" if y is None else f", actual {y.shape}")
            + "; expected [H, E] for both"
        )
    if experts is None:
        order = np.argsort(-np.nan_to_num(f.mean(axis=0)), kind="stable")
        sel = sorted(order[: min(max_experts, E)].tolist())
    else:
        sel = [int(e) for e in experts]
        if any(not 0 <= e < E for e in sel):
            raise InputError(f"experts={list(experts)}: indices must be in [0, {E})")
    ctx = min(T, 3 * H) if context is None else min(int(context), T)
    hs = np.arange(start + T - ctx, start + T, dtype=np.float64)
    fs = np.arange(start + T, start + T + H, dtype=np.float64)
    ax = c.new_axes(ax, (9, 3.6))
    hx, hb, b1 = c.bin_rows(hs, h[T - ctx :][:, sel], max_points)
    fx, fb, b2 = c.bin_rows(fs, f[:, sel], max_points)
    yb = c.bin_rows(fs, y[:, sel], max_points)[1] if y is not None else None
    wb = None
    if band is not None and y is None:
        w = np.asarray(band, dtype=np.float64) * 100
        if w.shape not in ((E,), (H, E)) or (w < 0).any():
            raise InputError(
                f"forecast_vs_actual: band must be non-negative [E={E}] or [H={H}, E={E}], got {np.shape(band)}"
            )
        wb = c.bin_rows(fs, np.broadcast_to(w, (H, E))[:, sel], max_points)[1]
    colors = c.line_colors(len(sel))
    origin = start + T - 0.5
    ax.axvline(origin, color="0.3", lw=1, label="forecast origin")
    for j, e in enumerate(sel):
        ax.plot(hx, hb[:, j], color=colors[j], lw=1.0, label=f"expert {e}")
        if yb is not None:
            ax.plot(fx, yb[:, j], color=colors[j], lw=0.8, alpha=0.6)
            ax.fill_between(fx, fb[:, j], yb[:, j], color=colors[j], alpha=0.18, lw=0)
        elif wb is not None:
            ax.fill_between(fx, fb[:, j] - wb[:, j], fb[:, j] + wb[:, j], color=colors[j], alpha=0.18, lw=0)
        ax.plot(fx, fb[:, j], color=colors[j], lw=2.0, ls="--")
    from matplotlib.artist import Artist
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    extra: list[Artist] = [Line2D([], [], color="0.2", lw=2.0, ls="--", label="forecast")]
    if yb is not None:
        extra += [
            Line2D([], [], color="0.2", lw=0.8, alpha=0.6, label="actual"),
            Patch(facecolor="0.2", alpha=0.18, label="error (forecast − actual)"),
        ]
    elif wb is not None:
        extra += [Patch(facecolor="0.2", alpha=0.18, label="forecast ± band")]
    handles, labels = ax.get_legend_handles_labels()
    handles += extra
    ax.legend(
        handles,
        labels + [x.get_label() for x in extra],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        borderaxespad=0.0,
        fontsize=8,
        frameon=False,
    )
    ax.set_xlim(min(hx[0], fx[0]) - 0.5, fx[-1] + 0.5)
    ax.set_xlabel("training step")
    ax.set_ylabel("share of routed tokens (%)")
    if layer_name is None and np.ndim(history) == 3:
        layer_name = f"layer {layer}"
    title = f"Forecast of {H:,} steps" + (f", {layer_name}" if layer_name else "")
    if y is not None:
        mae = float(np.nanmean(np.abs(f - y)))
        title += f": MAE {mae:.2f} pp over all {E} experts"
    ax.set_title(title, loc="left")
    notes = []
    if len(sel) < E:
        notes.append(f"{len(sel)} of {E} experts shown")
    if ctx < T:
        notes.append(f"last {ctx:,} of {T:,} history steps")
    b = max(b1, b2)
    if b > 1:
        notes.append(f"mean over {b:,}-step bins")
    c.note(ax, "; ".join(notes))
    c.step_axis(ax)
    return ax


def backtest_errors(
    df: Any,
    ax: Any = None,
    *,
    metric: str = "havg_mae_pp",
    phase: str | None = "all",
    predictors: Sequence[str] | None = None,
) -> Axes:
    """Bar chart of backtest error per predictor (groups) and horizon (colours).

    df: `evaluation.backtest` rows (one per origin x layer: bars are means, whiskers one
    standard error) or `evaluation.summarize` output (bars only). phase: "all" (every row), "stable",
    "transient", or None for one hatched bar per phase present. predictors: which and in what order
    (default: all, best first). Returns the Axes.
    """
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        raise InputError(
            f"backtest_errors: df must be a pandas DataFrame from evaluation.backtest, got {type(df).__name__}"
        )
    need = {"predictor", "horizon", metric}
    missing = need - set(df.columns)
    if missing:
        raise InputError(f"backtest_errors: df lacks column(s) {sorted(missing)}; has {list(df.columns)}")
    if df.empty:
        raise InputError("backtest_errors: df has no rows")
    d = df.copy()
    if "phase" not in d.columns:
        d["phase"] = "all"
    raw = "origin" in d.columns
    if raw and set(d["phase"]) != {"all"}:
        d = pd.concat([d, d.assign(phase="all")], ignore_index=True)
    present = [x for x in ("all", "stable", "transient") if x in set(d["phase"])]
    phases = present if phase is None else [phase]
    if phase is not None and phase not in present:
        raise InputError(f"backtest_errors: phase={phase!r} has no rows; phases present: {present}")
    d = d[d["phase"].isin(phases)]
    g = d.groupby(["predictor", "horizon", "phase"])[metric]
    stats = pd.DataFrame({"mean": g.mean(), "sem": g.sem() if raw else np.nan, "n": g.size()}).reset_index()
    if predictors is None:
        names = stats.groupby("predictor")["mean"].mean().sort_values().index.tolist()
    else:
        names = list(predictors)
        unknown = sorted(set(names) - set(stats["predictor"]))
        if unknown:
            raise InputError(
                f"backtest_errors: predictor(s) {unknown} not in df; have {sorted(set(stats['predictor']))}"
            )
    horizons = sorted(stats["horizon"].unique())
    combos = [(hz, ph) for hz in horizons for ph in phases]
    per_group = max(0.3 * len(combos), 0.075 * max(len(str(n)) for n in names) + 0.2)  # inches
    rotate = per_group * len(names) > 10.5
    ax = c.new_axes(ax, (min(12.0, max(6.0, 1.5 + per_group * len(names))), 4.4 if rotate else 3.8))
    colors = c.line_colors(len(horizons))
    hatches = {"all": "", "stable": "//", "transient": ".."}
    width = 0.8 / len(combos)
    key = stats.set_index(["predictor", "horizon", "phase"])
    x = np.arange(len(names))
    for k, (hz, ph) in enumerate(combos):
        rows = key.reindex([(n, hz, ph) for n in names])
        pos = x - 0.4 + width * (k + 0.5)
        label = f"horizon {hz:,}" + (f", {ph}" if len(phases) > 1 else "")
        yerr = rows["sem"].to_numpy() if raw else None
        bars = ax.bar(
            pos,
            rows["mean"].to_numpy(),
            width * 0.92,
            yerr=yerr,
            capsize=2 if raw else 0,
            color=colors[horizons.index(hz)],
            hatch=hatches.get(ph, "xx"),
            edgecolor="white",
            error_kw={"elinewidth": 0.8, "ecolor": "0.25"},
            label=label,
        )
        if len(names) * len(combos) <= 24:
            ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=2)
    ax.set_xticks(x, names, rotation=25 if rotate else 0, ha="right" if rotate else "center")
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.margins(y=0.12)
    ax.set_xlabel("predictor (best first)" if predictors is None else "predictor")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(
        f"Backtest error ({metric})" + (f", {phases[0]} phase" if len(phases) == 1 and phases[0] != "all" else ""),
        loc="left",
    )
    if raw:
        n_or = d["origin"].nunique()
        n_l = d["layer"].nunique() if "layer" in d.columns else 1
        c.note(ax, f"mean over {n_or} origins x {n_l} layers; whiskers: ±1 standard error")
    c.legend_outside(ax)
    return ax
