"""Figures of the paper reproduction (PNG): fluctuation with boundaries, heatmaps, forecast error
over time, per-GPU load and imbalance, backtest error bars. Each function writes one file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from moeload import plots, states

DPI = 100


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def fluctuation_grid(run: Any, path: Path, windows: tuple[int, ...] = (10, 100, 200)) -> Path:
    """Rows: window w; columns: range and variance of each expert's share (mean over experts), with
    the boundary the window rule finds at that window and statistic (dashed, one per layer)."""
    import matplotlib.pyplot as plt

    L = run.p.shape[1]
    fig, axes = plt.subplots(len(windows), 2, figsize=(17, 3.3 * len(windows) + 0.6), layout="constrained")
    for i, w in enumerate(windows):
        for j, stat in enumerate(("range", "var")):
            r = states.detect(run.counts, steps=run.steps, window=w, stat=stat)
            ax = plots.fluctuation(r, ax=axes[i, j])
            mb = f"model boundary {r.model_boundary:,}" if r.model_boundary >= 0 else "no model boundary"
            ax.set_title(f"{stat}, w = {w}\n{mb}", loc="right", fontsize=9, fontweight="bold", pad=15)
            if ax.get_legend() is not None:
                ax.get_legend().remove()
    handles, labels = axes[1, 0].get_legend_handles_labels()
    keep = [(h, lab) for h, lab in zip(handles, labels) if lab.startswith("layer")][:L]
    fig.legend([h for h, _ in keep], [f"MoE layer {k}" + (" (shallowest)" if k == 0 else " (deepest)" if k == L - 1 else "")
                                      for k in range(len(keep))],
               loc="outside right upper", fontsize=8, title="solid: statistic\ndashed: boundary\ndotted: threshold",
               title_fontsize=8)
    fig.suptitle(f"{run.setup} seed {run.seed}: load fluctuation per MoE layer (window rule, reference 'late')",
                 fontsize=12)
    return _save(fig, path)


def heatmaps(run: Any, path: Path) -> Path:
    """Load-proportion heatmaps of the shallowest and the deepest MoE layer."""
    import matplotlib.pyplot as plt

    L, E = run.p.shape[1], run.p.shape[2]
    fig, axes = plt.subplots(2, 1, figsize=(10, 8.5 if E > 32 else 7), layout="constrained")
    for ax, li, tag in zip(axes, (0, L - 1), ("shallowest", "deepest")):
        plots.load_heatmap(run.p, ax=ax, layer=li, steps=run.steps)
        ax.set_title(f"{tag} MoE layer", loc="right", fontsize=10, fontweight="bold", pad=15)
    fig.suptitle(f"{run.setup} seed {run.seed}: share of each expert's routed tokens", fontsize=11)
    return _save(fig, path)


def error_over_time(rows: dict[int, pd.DataFrame], boundaries: dict[int, int], horizons: tuple[int, ...],
                    path: Path, setup: str, metric: str = "havg_mae_pp", title: str | None = None) -> Path:
    """Error at each origin (mean over layers) per predictor; panels: test seed x horizon.
    Shaded: origins before the model boundary (some layer still transient)."""
    import matplotlib.pyplot as plt

    seeds = sorted(rows)
    names = sorted(set(rows[seeds[0]]["predictor"]))
    cmap = plt.get_cmap("tab10")
    colors = {n: cmap(i % 10) for i, n in enumerate(names)}
    fig, axes = plt.subplots(len(seeds), len(horizons), figsize=(6.2 * len(horizons) + 2, 3.6 * len(seeds)),
                             layout="constrained", squeeze=False, sharey="col")
    for i, seed in enumerate(seeds):
        d = rows[seed]
        for j, h in enumerate(horizons):
            ax = axes[i, j]
            m = d[d["horizon"] == h].groupby(["predictor", "origin"])[metric].mean()
            for n in names:
                if n in m.index.get_level_values(0):
                    s = m.loc[n]
                    ax.plot(s.index, s.to_numpy(), marker="o", ms=2.5, lw=1.6 if n == "sw_avg" else 1.0,
                            color="black" if n == "sw_avg" else colors[n], label=n)
            b = boundaries[seed]
            if b > 0:
                ax.axvspan(ax.get_xlim()[0], b, color="0.9", zorder=0, label="before model boundary")
            ax.set_yscale("log")
            _plain_log_ticks(ax)
            ax.set_title(f"seed {seed}, horizon {h:,}", loc="left", fontsize=10)
            ax.set_xlabel("forecast origin (step)")
            ax.set_ylabel(f"{metric} (mean over layers)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.suptitle(title or f"{setup}: forecast error at each origin (tested on the seed shown; SW_Avg window, LSTM and "
                 f"blend weights from the other seed)", fontsize=11)
    return _save(fig, path)


def _plain_log_ticks(ax: Any) -> None:
    """Plain numbers on a log y axis."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter(""))


def gpu_loads(run: Any, path: Path) -> Path:
    """Per-GPU load and imbalance (max / mean over GPUs) of the shallowest and the deepest MoE layer,
    under the expert -> GPU map recorded in the trace."""
    import matplotlib.pyplot as plt

    L = run.p.shape[1]
    fig, axes = plt.subplots(2, 2, figsize=(16, 6.2), layout="constrained", height_ratios=(3, 2), sharex=True)
    for j, li in enumerate((0, L - 1)):
        plots.gpu_load(run.gpu_loads[:, li], ax=axes[:, j], steps=run.steps, layer=li, unit="routed assignments")
    fig.suptitle(f"{run.setup} seed {run.seed}: per-GPU load under the recorded expert -> GPU map "
                 f"(ep_size {run.gpu_loads.shape[2]}), MoE layers 0 (shallowest) and {L - 1} (deepest)", fontsize=11)
    return _save(fig, path)


def error_bars(rows: pd.DataFrame, path: Path, setup: str, seed: int) -> Path:
    """`plots.backtest_errors` per phase for one test seed (havg_mae_pp, bars = means, whiskers 1 s.e.)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(12, 12), layout="constrained")
    for ax, ph in zip(axes, ("all", "stable", "transient")):
        plots.backtest_errors(rows, ax=ax, phase=ph)
        ax.set_title(f"phase: {ph}", loc="right", fontsize=10, fontweight="bold", pad=15)
    fig.suptitle(f"{setup}, tested on seed {seed} (SW_Avg window, LSTM and blend weights from the other seed)",
                 fontsize=11)
    return _save(fig, path)


def boundary_markers(results: dict[str, Any]) -> dict[int, int]:
    """Seed -> model boundary (step) of the window rule."""
    return {int(s): int(r["window"].model_boundary) for s, r in results.items()}


__all__ = ["boundary_markers", "error_bars", "error_over_time", "fluctuation_grid", "gpu_loads", "heatmaps"]
