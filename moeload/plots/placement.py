"""Figure of per-GPU load and imbalance over time, for one placement or before / after a new one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from moeload.errors import InputError
from moeload.plots import _common as c

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _series(x: Any, name: str, layer: int) -> tuple[np.ndarray | None, np.ndarray]:
    """-> (loads [S, G] or None, imbalance [S]) from [S, G], [S, L, G], [S], a placement
    Evaluation (its gpu_load) or a ReplayResult (its step_imbalance [S, L])."""
    if hasattr(x, "gpu_load") and hasattr(x, "imbalance"):
        x = x.gpu_load
    elif hasattr(x, "step_imbalance"):
        imb = c.array(x.step_imbalance, f"{name}.step_imbalance", (2,))
        if not -imb.shape[1] <= layer < imb.shape[1]:
            raise InputError(f"layer={layer}: {name} has {imb.shape[1]} layers")
        return None, imb[:, layer]
    a = c.array(x, name, (1, 2, 3))
    if a.ndim == 3:
        if not -a.shape[1] <= layer < a.shape[1]:
            raise InputError(f"layer={layer}: {name} has {a.shape[1]} layers")
        a = a[:, layer]
    if a.ndim == 1:
        return None, a
    if (a < 0).any():
        raise InputError(f"{name}: GPU loads must be non-negative")
    mean = a.mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        imb = np.where(mean > 0, a.max(axis=1) / np.where(mean > 0, mean, 1.0), np.nan)
    return a, imb


def gpu_load(
    loads: Any = None,
    before: Any = None,
    after: Any = None,
    ax: Any = None,
    *,
    steps: Any = None,
    layer: int = 0,
    labels: tuple[str, str] = ("before", "after"),
    unit: str = "tokens",
    max_points: int = c.MAX_POINTS,
) -> Axes:
    """Per-GPU load (top) and imbalance max / mean over GPUs (bottom) over training.

    loads: one run's per-GPU loads [S, G] (or [S, L, G] / a `placement.Evaluation`: pick
    `layer`), its imbalance series [S], or a `placement.ReplayResult` (its step_imbalance).
    before, after: two such runs over the same steps to compare, e.g. the recorded placement and
    a new plan replayed on the same counts; with both, `loads` is left out. One run with G <= 16 GPUs draws a line per GPU; a comparison draws each run's
    busiest GPU, mean and min..max band. ax: where to draw (default a new figure): two Axes (load,
    imbalance) where there are per-GPU loads, one Axes for imbalance series only. Returns the
    imbalance Axes (its `.figure` holds both panels).
    """
    runs = [(lab, x) for lab, x in (("load", loads), (labels[0], before), (labels[1], after)) if x is not None]
    if not runs:
        raise InputError("gpu_load: give loads, or before and after")
    if loads is not None and len(runs) > 1:
        raise InputError("gpu_load: pass either loads (one run) or before/after (a comparison), not both")
    data = [(lab, *_series(x, f"gpu_load: {lab if lab != 'load' else 'loads'}", layer)) for lab, x in runs]
    S = len(data[0][2])
    if any(len(imb) != S for _, _, imb in data):
        raise InputError(f"gpu_load: runs cover different numbers of steps {[len(i) for _, _, i in data]}")
    s = c.step_numbers(steps, S)
    has_loads = any(ld is not None for _, ld, _ in data)
    if ax is None:
        import matplotlib.pyplot as plt

        if has_loads:
            _, (top, bottom) = plt.subplots(
                2, 1, figsize=(9, 5.6), sharex=True, layout="constrained", height_ratios=(3, 2)
            )
        else:
            top, (_, bottom) = None, plt.subplots(figsize=(9, 3.2), layout="constrained")
    else:
        axes = list(ax) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
        if has_loads and len(axes) != 2:
            raise InputError(f"gpu_load: ax must be two Axes (load, imbalance) for per-GPU loads, got {len(axes)}")
        top, bottom = (axes[0], axes[1]) if has_loads else (None, axes[-1])
    xs, _, b = c.bin_rows(s, data[0][2][:, None], max_points)
    run_colors = {labels[0]: "#d62728", labels[1]: "#1f77b4", "load": "0.15"}
    if has_loads:
        first = data[0][1]  # [S, G]; not None when it is the only run and has_loads
        single = len(data) == 1 and first is not None and first.shape[1] <= 16
        for lab, ld, _ in data:
            if ld is None:
                continue
            _, lb, _ = c.bin_rows(s, ld, max_points)
            if single:
                for g, col in enumerate(c.line_colors(ld.shape[1])):
                    top.plot(xs, lb[:, g], color=col, lw=1.0, label=f"GPU {g}")
            else:
                col = run_colors[lab]
                name = "" if lab == "load" else f"{lab}: "
                top.fill_between(
                    xs, lb.min(axis=1), lb.max(axis=1), color=col, alpha=0.18, lw=0, label=f"{name}min..max over GPUs"
                )
                top.plot(xs, lb.max(axis=1), color=col, lw=1.3, label=f"{name}busiest GPU")
        mean_all = np.mean(
            [c.bin_rows(s, ld, max_points)[1].mean(axis=1) for _, ld, _ in data if ld is not None], axis=0
        )
        top.plot(xs, mean_all, color="0.2", lw=1.0, ls=":", label="mean over GPUs")
        top.set_ylabel(f"load per step ({unit})")
        top.set_ylim(bottom=0)
        G = next(ld.shape[1] for _, ld, _ in data if ld is not None)
        top.set_title(f"Per-GPU load, layer {layer}, {G} GPUs", loc="left")
        c.note(top, c.bin_note(s, b))
        c.legend_outside(top)
    for lab, _, imb in data:
        _, ib, _ = c.bin_rows(s, imb[:, None], max_points)
        name = "imbalance" if lab == "load" else lab
        bottom.plot(xs, ib[:, 0], color=run_colors[lab], lw=1.2, label=f"{name} (mean {np.nanmean(imb):.3g})")
    bottom.axhline(1.0, color="0.4", lw=1, ls="--", label="perfect balance")
    bottom.set_ylabel("imbalance\n(max / mean GPU load)")
    bottom.set_xlabel("training step")
    bottom.set_title("Imbalance" + ("" if has_loads else f", layer {layer}"), loc="left")
    if not has_loads:
        c.note(bottom, c.bin_note(s, b))
    edges = c.edges_of(xs)
    bottom.set_xlim(edges[0], edges[-1])
    bottom.set_ylim(bottom=min(0.95, bottom.get_ylim()[0]))
    c.legend_outside(bottom)
    c.step_axis(bottom)
    return bottom
