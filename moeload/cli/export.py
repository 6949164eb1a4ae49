"""`export`: counts or proportions of a trace as CSV, NumPy .npy or .npz."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import typer

from moeload.cli._common import (
    LAYERS_OPTION,
    SKIP_BAD_PARTS_OPTION,
    STEPS_OPTION,
    console,
    load_window,
    open_trace_arg,
    progress_status,
    refuse_output_inside,
)
from moeload.errors import InputError

FORMATS = ("csv", "npy", "npz")


def write_array(
    out: Path,
    arr: np.ndarray,
    value: str,
    *,
    steps: np.ndarray,
    layer_ids: np.ndarray,
    trace,
    step_col: str = "step",
    fmt: str | None = None,
) -> str:
    """Write arr: [S, L, E] to `out`. CSV is tidy (step, layer, layer_name, expert, and `value`
    without its plural s, e.g. count; padded experts of narrower layers left out); .npz holds
    `value` (e.g. counts), `steps` [S], `layers` [L] names and `experts_per_layer` [L]; .npy holds
    the array alone. Returns the format used."""
    out = Path(out)
    fmt = (fmt or out.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise InputError(f"{out}: unknown output format {fmt!r}; use a .csv, .npy or .npz file (or --format)")
    if out.parent and not out.parent.exists():
        raise InputError(f"{out}: directory {out.parent} does not exist")
    names = np.asarray([trace.layers[i] for i in layer_ids])
    experts = np.asarray([trace.experts_per_layer[i] for i in layer_ids], dtype=np.int64)
    if fmt == "npy":
        np.save(out, arr)
    elif fmt == "npz":
        arrays: dict[str, Any] = {value: arr, "steps": np.asarray(steps), "layers": names, "experts_per_layer": experts}
        np.savez_compressed(out, **arrays)
    else:
        import pandas as pd

        S, L, E = arr.shape
        idx = np.indices((S, L, E)).reshape(3, -1)
        keep = idx[2] < experts[idx[1]]
        idx = idx[:, keep]
        df = pd.DataFrame(
            {
                step_col: np.asarray(steps)[idx[0]],
                "layer": np.asarray(layer_ids)[idx[1]],
                "layer_name": names[idx[1]],
                "expert": idx[2],
                value.removesuffix("s"): arr.reshape(-1)[keep],
            }
        )
        df.to_csv(out, index=False)
    return fmt


def export(
    trace: Path = typer.Argument(..., help="Trace directory.", show_default=False),
    out: Path = typer.Argument(
        ..., help="Output file: .csv (tidy), .npy ([S, L, E]) or .npz (with steps and layer names).", show_default=False
    ),
    what: str = typer.Option("counts", "--what", help="counts (int64) or proportions (float64, rows sum to 1)."),
    fmt: str = typer.Option(None, "--format", help="csv, npy or npz (default: from the file suffix)."),
    steps: str = STEPS_OPTION,
    layers: str = LAYERS_OPTION,
    skip_bad_parts: bool = SKIP_BAD_PARTS_OPTION,
) -> None:
    """Export counts or proportions of a step range and layer selection.

    Example: moeload export runs/exp1.moeload counts.npz --steps 1000:2000 --layers 0,1
    """
    if what not in ("counts", "proportions"):
        raise InputError(f"--what {what!r}: expected 'counts' or 'proportions'")
    refuse_output_inside(out, trace, "the output file")
    t = open_trace_arg(trace, skip_bad_parts)
    with progress_status(f"exporting {what}"):
        step_nums, lay, arr = load_window(t, steps, layers, what=what)
        used = write_array(out, arr, what, steps=step_nums, layer_ids=lay, trace=t, fmt=fmt)
    console().print(f"wrote {what} [{arr.shape[0]}, {arr.shape[1]}, {arr.shape[2]}] as {used} to {out}")


def register(app: typer.Typer) -> None:
    app.command("export")(export)
