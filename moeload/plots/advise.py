"""Figure of `moeload advise`: predicted MoE-layer time per step under each strategy."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from moeload.plots import _common as c

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def strategies(advice: Any, ax: Any = None) -> Axes:
    """Horizontal bars of `advice.table.step_ms` per strategy, saving % and its interval as text."""
    ax = c.new_axes(ax, (7.0, 3.4))
    tab = advice.table
    names = list(tab["name"])
    ms = tab["step_ms"].to_numpy(dtype=float)
    colors = [
        "#888888"
        if n == "none"
        else "#2a9d8f"
        if n == advice.recommended
        else "#bbbbbb"
        if n == "oracle"
        else "#4c72b0"
        for n in names
    ]
    y = np.arange(len(names))[::-1]
    ax.barh(y, ms, color=colors)
    for yi, (_, r) in zip(y, tab.iterrows()):
        label = (
            ""
            if r["name"] == "none"
            else (f"  {r['saving_pct']:+.1f} % ({r['saving_lo']:+.1f} .. {r['saving_hi']:+.1f})")
        )
        ax.text(r["step_ms"], yi, label, va="center", fontsize=8)
    ax.set_yticks(y, names)
    ax.set_xlim(0, ms.max() * 1.35 if ms.size else 1)
    ax.set_xlabel("predicted MoE-layer time per step (ms)")
    ax.set_title(f"balancing strategies - recommended: {advice.recommended}", loc="left")
    c.note(
        ax,
        f"{advice.info['steps']} steps, {advice.info['gpus']} GPUs, {advice.calibration} calibration, "
        f"all-to-all {advice.info['all_to_all']}",
    )
    return ax


def savefig(advice: Any, path: str | Path) -> None:
    """Draw `strategies(advice)` and save it to `path`."""
    import matplotlib.pyplot as plt

    fig = cast("Figure", strategies(advice).figure)  # a figure of its own, not a subfigure
    fig.savefig(path, dpi=120)
    plt.close(fig)
