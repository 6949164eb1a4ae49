"""Figures of expert load over training: heatmap, proportions with phases, per-layer fluctuation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from moeload.errors import InputError
from moeload.plots import _common as c

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _layer_proportions(data: Any, layer: int | str, steps: Any, name: str) -> tuple[np.ndarray, np.ndarray, int, str]:
    """-> (p [S, E] in %, step numbers [S], layer index, label) from a Trace, [S, L, E] or [S, E]."""
    if c.is_trace(data):
        p = data.proportions(steps=steps, layers=[layer])[:, 0]
        li = data.layers.index(layer) if isinstance(layer, str) else int(layer) % data.num_layers
        p = p[:, : data.experts_per_layer[li]]
        s = c.trace_steps(data, steps).astype(np.float64)
        return p * 100, s, li, f"layer {li} ({data.layers[li]})"
    a = c.array(data, name, (2, 3))
    if a.ndim == 2:
        return a * 100, c.step_numbers(steps, len(a)), 0, ""
    if not isinstance(layer, (int, np.integer)) or not -a.shape[1] <= layer < a.shape[1]:
        raise InputError(f"layer={layer!r}: {name} has {a.shape[1]} layers; pass an index")
    li = int(layer) % a.shape[1]
    return a[:, li] * 100, c.step_numbers(steps, len(a)), li, f"layer {li}"


def load_heatmap(
    data: Any,
    ax: Any = None,
    *,
    layer: int | str = 0,
    steps: Any = None,
    max_points: int = c.MAX_POINTS,
    cmap: str = "viridis",
    vmax: float | None = None,
) -> Axes:
    """Heatmap of one layer's expert load: training step (x) x expert (y), colour = share in %.

    data: proportions [S, E], [S, L, E] (pick `layer`) or a Trace (then `steps` is a step
    selection as in `Trace.proportions`; otherwise `steps` [S] gives the step numbers of the rows).
    More than `max_points` steps are averaged over bins of consecutive steps (said on the figure).
    vmax: top of the colour scale in % (default: the 99.5th percentile, so that one hot expert
    does not flatten the rest; the colour bar then shows an arrow for clipped values).
    Returns the Axes; the colour bar is `ax.images[0].colorbar` (or the mesh's for uneven steps).
    """
    p, s, _, label = _layer_proportions(data, layer, steps, "load_heatmap: data")
    S, E = p.shape
    ax = c.new_axes(ax, (9, 3.6))
    xs, pb, b = c.bin_rows(s, p, max_points)
    edges = c.edges_of(xs)
    d = np.diff(xs)
    finite = pb[np.isfinite(pb)]
    top = float(finite.max()) if finite.size else 100.0 / E
    if vmax is None:
        vmax = max(float(np.percentile(finite, 99.5)) if finite.size else top, 100.0 / E)
    if len(d) < 2 or np.allclose(d, d[0], rtol=1e-3):
        im = ax.imshow(
            pb.T,
            aspect="auto",
            origin="lower",
            interpolation="nearest",
            cmap=cmap,
            extent=(edges[0], edges[-1], -0.5, E - 0.5),
            vmin=0,
            vmax=vmax,
        )
    else:
        im = ax.pcolormesh(edges, np.arange(E + 1) - 0.5, pb.T, cmap=cmap, vmin=0, vmax=vmax)
    cb = ax.figure.colorbar(im, ax=ax, pad=0.01, extend="max" if top > vmax * 1.001 else "neither")
    cb.set_label("share of routed tokens (%)")
    cb.ax.axhline(100.0 / E, color="white", lw=1.5)
    cb.ax.axhline(100.0 / E, color="black", lw=0.8, ls="--")
    ax.set_xlabel("training step")
    ax.set_ylabel("expert")
    ax.set_xlim(edges[0], edges[-1])
    if E <= 32:
        ax.set_yticks(np.arange(E))
        ax.tick_params(axis="y", labelsize=7 if E > 16 else 9)
    ax.set_title(f"Expert load{', ' + label if label else ''}", loc="left")
    c.note(ax, "; ".join(x for x in (c.bin_note(s, b), f"dashed on colour bar: uniform {100 / E:.3g}%") if x))
    c.step_axis(ax)
    return ax


def _labels_of(labels: Any, layer: int, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    lab = np.asarray(labels.labels if hasattr(labels, "labels") else labels)  # [S], [S, L] or a StateResult
    if lab.ndim == 2 and lab.shape[1] == 1:
        lab = lab[:, 0]
    elif lab.ndim == 2 and layer < lab.shape[1]:
        lab = lab[:, layer]
    if lab.shape != (n,):
        raise InputError(f"labels: expected [S={n}] booleans (True = stable), got shape {lab.shape}")
    return lab.astype(bool)


def proportions_over_time(
    p: Any,
    steps: Any = None,
    labels: Any = None,
    ax: Any = None,
    *,
    layer: int | str = 0,
    experts: Sequence[int] | None = None,
    max_points: int = c.MAX_POINTS,
) -> Axes:
    """Each expert's share over training, with transient / stable phases shaded.

    p: proportions [S, E], [S, L, E] (pick `layer`) or a Trace; steps: [S] step numbers (or a
    step selection for a Trace); labels: [S] bool (True = stable), or [S, L] / a
    `states.StateResult` (column `layer` is used). experts: which experts to draw (default all).
    Returns the Axes.
    """
    x, s, li, label = _layer_proportions(p, layer, steps, "proportions_over_time: p")
    S, E = x.shape
    lab = _labels_of(labels, li, S)
    if experts is None:
        sel = list(range(E))
    else:
        sel = [int(e) for e in experts]
        if any(not 0 <= e < E for e in sel):
            raise InputError(f"experts={list(experts)}: indices must be in [0, {E})")
    ax = c.new_axes(ax, (9, 3.6))
    xs, xb, b = c.bin_rows(s, x[:, sel], max_points)
    edges = c.edges_of(xs)
    if lab is not None:
        _, lb, _ = c.bin_rows(s, lab[:, None].astype(np.float64), max_points)
        stable = lb[:, 0] >= 0.5
        c.shade_runs(ax, edges, ~stable, c.TRANSIENT_COLOR, "transient phase")
        c.shade_runs(ax, edges, stable, c.STABLE_COLOR, "stable phase")
    colors = c.line_colors(len(sel))
    many = len(sel) > 20
    lw = 0.8 if many else 1.1
    for j, e in enumerate(sel):
        ax.plot(xs, xb[:, j], color=colors[j], lw=lw, label=None if many else f"expert {e}")
    ax.axhline(100.0 / E, color="0.3", lw=1, ls="--", label=f"uniform (1/{E})")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("share of routed tokens (%)")
    ax.set_title(f"Expert load over time{', ' + label if label else ''}", loc="left")
    notes = [c.bin_note(s, b)]
    if many:
        notes.append(f"{len(sel)} experts, legend omitted")
    c.note(ax, "; ".join(n for n in notes if n))
    c.legend_outside(ax)
    c.step_axis(ax)
    return ax


def rolling_fluctuation(
    p: np.ndarray, window: int, stat: str = "range", agg: str = "mean", experts: Sequence[int] | None = None
) -> np.ndarray:
    """Per-layer fluctuation of proportions p: [S, L, E] over trailing windows of `window` rows.

    The window rule's own statistic (`states.window.window_statistic`, what `states.detect(p,
    method="window", window=..., stat=..., agg=...)` thresholds), so a figure and the detector
    cannot disagree: each expert's share over the window gives a range (max - min, stat="range")
    or a sample variance (ddof=1, stat="var"), in units of proportions; `agg` ("mean" or "max")
    combines the experts; steps without tokens (all-NaN rows) are skipped, and a window with fewer
    than max(2, window // 2) of them is NaN. experts: [L] experts per layer, where layers have
    fewer than E (the columns past them are padding and left out). Returns [S, L]; the first
    window - 1 rows are NaN (a window longer than the S rows is cut to S).
    """
    from moeload.states.window import window_statistic

    if stat not in ("range", "var"):
        raise InputError(f"stat={stat!r}: choose 'range' or 'var' (the window rule's statistics)")
    if agg not in ("mean", "max"):
        raise InputError(f"agg={agg!r}: choose 'mean' or 'max'")
    if int(window) < 2:
        raise InputError(f"window={window}: must be at least 2 steps")
    x = c.array(p, "rolling_fluctuation: p", (3,))
    return window_statistic(x, max(2, min(int(window), x.shape[0])), stat, agg, experts)


def fluctuation(
    data: Any,
    window: int = 100,
    boundaries: Any = None,
    ax: Any = None,
    *,
    stat: str = "range",
    agg: str = "mean",
    steps: Any = None,
    threshold: Any = None,
    layer_names: Sequence[str] | None = None,
    max_points: int = c.MAX_POINTS,
    log: bool = True,
) -> Axes:
    """Fluctuation of each layer's load over training, with each layer's stable-phase boundary.

    data: proportions [S, L, E] or a Trace (the statistic is `rolling_fluctuation(p, window,
    stat, agg)`), a per-layer statistic [S, L] drawn as given, or a `states.StateResult` (its
    fluctuation, threshold, steps and boundaries). boundaries: [L] step number where each layer's
    final stable phase starts (-1 = none). threshold: scalar, [L] or [S, L], drawn dotted.
    Returns the Axes.
    """
    computed = True  # the statistic is computed here (not given)
    title = "Load fluctuation per layer"
    if hasattr(data, "fluctuation") and hasattr(data, "boundaries"):  # states.StateResult
        stat_v = c.array(data.fluctuation, "fluctuation: data.fluctuation", (2,))
        steps = data.steps if steps is None else steps
        boundaries = data.boundaries if boundaries is None else boundaries
        if threshold is None and np.isfinite(np.asarray(data.threshold, dtype=np.float64)).any():
            threshold = data.threshold
        ylabel, computed = _state_label(data), False
    elif c.is_trace(data):
        layer_names = layer_names or [f"{i}: {n}" for i, n in enumerate(data.layers)]
        s_arr = c.trace_steps(data, steps)
        stat_v = rolling_fluctuation(data.proportions(steps=steps), window, stat, agg, data.experts_per_layer)
        steps = s_arr
        ylabel = _stat_label(stat, agg)
    else:
        a = c.array(data, "fluctuation: data", (2, 3))
        if a.ndim == 3:
            stat_v, ylabel = rolling_fluctuation(a, window, stat, agg), _stat_label(stat, agg)
        else:
            stat_v, ylabel, computed = a, "fluctuation", False
    S, L = stat_v.shape
    s = c.step_numbers(steps, S)
    names = list(layer_names) if layer_names is not None else [f"layer {i}" for i in range(L)]
    if len(names) != L:
        raise InputError(f"layer_names: {len(names)} names for {L} layers")
    ax = c.new_axes(ax, (9, 3.6))
    xs, yb, b = c.bin_rows(s, stat_v, max_points)
    colors = c.line_colors(L)
    for li in range(L):
        ax.plot(xs, yb[:, li], color=colors[li], lw=1.1, label=names[li])
    if threshold is not None:
        given = np.asarray(threshold, dtype=np.float64)
        if not (given.ndim <= 1 or given.shape == (S, L)):
            raise InputError(
                f"threshold: expected a scalar, [L={L}] or [S={S}, L={L}], got shape {np.shape(threshold)}"
            )
        thr = np.broadcast_to(given if given.ndim != 1 else given[None, :], (S, L))
        _, tb, _ = c.bin_rows(s, np.array(thr, dtype=np.float64), max_points)
        same = np.allclose(tb, tb[:, :1], equal_nan=True)
        for li in range(1 if same else L):
            ax.plot(
                xs,
                tb[:, li],
                color="0.2" if same else colors[li],
                lw=1,
                ls=":",
                label=("threshold" if same else "threshold (per layer)") if li == 0 else None,
            )
    if boundaries is not None:
        bnd = np.asarray(boundaries, dtype=np.float64).reshape(-1)
        if len(bnd) != L:
            raise InputError(f"boundaries: {len(bnd)} entries for {L} layers")
        for li, bv in enumerate(bnd):
            if bv >= 0:
                ax.axvline(bv, color=colors[li], lw=1.3, ls="--", label=f"{names[li]} stable from {int(bv):,}")
    edges = c.edges_of(xs)
    ax.set_xlim(edges[0], edges[-1])
    if log and np.nanmin(np.where(yb > 0, yb, np.nan), initial=np.inf) < np.inf:
        ax.set_yscale("log")
        c.plain_log_ticks(ax.yaxis)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, loc="left")
    notes = [c.bin_note(s, b)]
    if computed:
        notes.insert(0, f"trailing window of {min(window, S)} recorded steps")
    elif "window" in (getattr(data, "params", None) or {}):
        notes.insert(0, f"{data.method} rule, window of {data.params['window']} steps")
    c.note(ax, "; ".join(n for n in notes if n))
    c.legend_outside(ax)
    c.step_axis(ax)
    return ax


def _stat_label(stat: str, agg: str) -> str:
    return f"{agg} over experts of\nrolling {stat} (share)"


def _state_label(r: Any) -> str:
    """Axis label of a StateResult's fluctuation; notes the window of the window rule."""
    prm = getattr(r, "params", {}) or {}
    if r.method == "window" and {"stat", "agg"} <= set(prm):
        return f"{prm['agg']} over experts of\nrolling {prm['stat']} (share)"
    return f"fluctuation ({r.method})"
