"""Shared helpers of the figures: input checks, step binning, axes creation and on-figure notes."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from moeload.errors import InputError

MAX_POINTS = 2000
"""Most points drawn per line (or columns per heatmap); longer inputs are averaged over step bins."""

STABLE_COLOR = "#cfe8c4"
TRANSIENT_COLOR = "#fbd9b9"
NOTE_STYLE = {"fontsize": 8, "color": "0.35"}


def array(x: Any, name: str, ndims: tuple[int, ...]) -> np.ndarray:
    """`x` as a float64 array with one of `ndims` dimensions and at least one row, else InputError."""
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected a numeric array, got {type(x).__name__}") from None
    if a.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise InputError(f"{name}: expected a {want} array, got shape {a.shape}")
    if a.shape[0] == 0:
        raise InputError(f"{name}: is empty (0 steps)")
    return a


def step_numbers(steps: Any, n: int, name: str = "steps", start: int = 0) -> np.ndarray:
    """[n] step numbers: `steps` checked against n rows, or start..start+n-1 when None."""
    if steps is None:
        return np.arange(start, start + n, dtype=np.float64)
    s = np.asarray(steps, dtype=np.float64).reshape(-1)
    if len(s) != n:
        raise InputError(f"{name}: has {len(s)} entries for {n} rows of data")
    if n > 1 and np.any(np.diff(s) <= 0):
        raise InputError(f"{name}: step numbers must be strictly increasing")
    return s


def is_trace(obj: Any) -> bool:
    return hasattr(obj, "proportions") and hasattr(obj, "steps") and hasattr(obj, "manifest")


def trace_steps(trace: Any, sel: Any) -> np.ndarray:
    """[S] step numbers that `trace.proportions(steps=sel)` returns rows for."""
    all_steps = trace.steps
    if sel is None:
        return all_steps
    if isinstance(sel, (tuple, slice)):
        start, stop = (sel.start, sel.stop) if isinstance(sel, slice) else sel
        keep = np.ones(len(all_steps), bool)
        if start is not None:
            keep &= all_steps >= start
        if stop is not None:
            keep &= all_steps < stop
        return all_steps[keep]
    return np.asarray(list(sel) if isinstance(sel, range) else sel, dtype=np.int64).reshape(-1)


def bin_rows(
    steps: np.ndarray, x: np.ndarray, max_points: int = MAX_POINTS, how: str = "mean"
) -> tuple[np.ndarray, np.ndarray, int]:
    """Average (or max) consecutive rows so that at most `max_points` remain.

    steps: [S]; x: [S, ...]. Returns (bin centres [B], binned x [B, ...], rows per bin). NaN rows
    are ignored inside a bin; a bin of only NaN stays NaN.
    """
    S = len(steps)
    b = int(np.ceil(S / max(int(max_points), 1)))
    if b <= 1:
        return steps, x, 1
    nb = -(-S // b)
    pad = nb * b - S
    xs = np.concatenate([x, np.full((pad,) + x.shape[1:], np.nan)]) if pad else x
    xs = xs.reshape((nb, b) + x.shape[1:])
    ss = np.concatenate([steps, np.full(pad, np.nan)]) if pad else steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = np.nanmax(xs, axis=1) if how == "max" else np.nanmean(xs, axis=1)
        centres = np.nanmean(ss.reshape(nb, b), axis=1)
    return centres, out, b


def bin_note(steps: np.ndarray, rows_per_bin: int, how: str = "mean") -> str:
    """'mean over 50-step bins' (or 'bins of 50 recorded steps' where steps are not evenly spaced)."""
    if rows_per_bin <= 1:
        return ""
    d = np.diff(steps)
    if len(d) and np.allclose(d, d[0]):
        return f"{how} over {int(round(d[0] * rows_per_bin)):,}-step bins"
    return f"{how} over bins of {rows_per_bin:,} recorded steps"


def new_axes(ax: Any, figsize: tuple[float, float]):
    """`ax`, or the axes of a new constrained-layout figure of `figsize` inches."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def note(ax: Any, text: str) -> None:
    """Small grey subtitle under the (left) title: binning, windows, units. Call after set_title."""
    if text:
        ax.text(0.0, 1.015, text, transform=ax.transAxes, ha="left", va="bottom", gid="moeload-note", **NOTE_STYLE)
        ax.set_title(ax.get_title(loc="left"), loc="left", pad=15)


def plain_log_ticks(axis: Any) -> None:
    """Tick labels of a log axis as plain numbers (0.5, 2, 30) instead of powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def legend_outside(ax: Any, **kw: Any) -> None:
    """Legend to the right of the axes, outside the data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(
            handles,
            labels,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            borderaxespad=0.0,
            fontsize=8,
            frameon=False,
            **kw,
        )


def line_colors(n: int) -> list:
    """n distinguishable colours: tab10 / tab20, a sampled colormap beyond 20."""
    import matplotlib as mpl

    if n <= 10:
        return [mpl.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [mpl.colormaps["tab20"](i) for i in range(n)]
    cmap = mpl.colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def shade_runs(ax: Any, edges: np.ndarray, flags: np.ndarray, color: str, label: str) -> None:
    """Shade the x-ranges where `flags` [B] is True; bin i spans edges[i]..edges[i+1] (edges [B+1])."""
    f = np.asarray(flags, bool)
    if not f.any():
        return
    d = np.diff(np.r_[0, f.astype(np.int8), 0])
    starts, stops = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    ranges = [(edges[a], edges[b] - edges[a]) for a, b in zip(starts, stops)]
    ax.broken_barh(
        ranges, (0, 1), transform=ax.get_xaxis_transform(), facecolor=color, edgecolor="none", zorder=0, label=label
    )


def edges_of(centres: np.ndarray) -> np.ndarray:
    """[B+1] bin edges halfway between [B] centres (a 1-step bin where B == 1)."""
    c = np.asarray(centres, dtype=np.float64)
    if len(c) == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    mid = (c[1:] + c[:-1]) / 2
    return np.r_[c[0] - (mid[0] - c[0]), mid, c[-1] + (c[-1] - mid[-1])]


def step_axis(ax: Any) -> None:
    """Training-step tick labels with thousands as 'k' (20k) once steps reach 10,000."""
    from matplotlib.ticker import FuncFormatter

    lo, hi = ax.get_xlim()
    if max(abs(lo), abs(hi)) >= 10_000:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v else "0"))
