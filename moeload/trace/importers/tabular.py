"""Plain tidy CSV: one row per (step, layer, expert) with a count.

Columns: step, layer, expert, count (required); layer_name (optional: module path of the layer);
rank (optional: counts per rank, then the trace records ranks). `layer` is a layer index (or a
name when it is not numeric). `moeload export TRACE out.csv` writes this format.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from moeload.errors import InputError, TraceFormatError
from moeload.trace.importers._common import MAX_EXPERTS, MAX_RANKS, Imported, check_dense, counts_array

REQUIRED = ("step", "layer", "expert", "count")


def read_csv(source: str | os.PathLike, *, num_experts: int | None = None, top_k: int | None = None) -> Imported:
    """Read a tidy CSV. num_experts: experts per layer (default: largest expert index + 1 per layer)."""
    import pandas as pd

    path = Path(source)
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give the CSV file")
    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise TraceFormatError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        hint = " (proportions cannot be imported; export counts)" if "proportion" in df.columns else ""
        raise TraceFormatError(f"{path}: missing column(s) {missing}; need {list(REQUIRED)}{hint}")
    if df.empty:
        raise InputError(f"{path}: no rows")
    for c in ("step", "layer", "expert", "count") + (("rank",) if "rank" in df.columns else ()):
        if df[c].isna().any():
            raise TraceFormatError(
                f"{path}: column {c!r} has empty or NaN cells (row {int(df[c].isna().to_numpy().argmax()) + 2})"
            )
        if c == "layer":
            continue
        try:
            num = pd.to_numeric(df[c]).to_numpy()
        except ValueError:
            raise TraceFormatError(f"{path}: column {c!r} must hold integers") from None
        df[c] = counts_array(num, f"{path}: column {c!r}", what="values")
    for c, limit in (("expert", MAX_EXPERTS), ("rank", MAX_RANKS)):
        if c in df.columns and df[c].max() >= limit:
            raise TraceFormatError(f"{path}: column {c!r} holds {df[c].max()}, implausibly large (limit {limit})")
    key = ["step", "layer", "expert"] + (["rank"] if "rank" in df.columns else [])
    dup = df.duplicated(key)
    if dup.any():
        row = df[dup].iloc[0]
        raise TraceFormatError(f"{path}: duplicate row for {dict(zip(key, (row[k] for k in key)))}")
    numeric_layer = pd.to_numeric(df["layer"], errors="coerce")
    if numeric_layer.notna().all():
        lid = counts_array(numeric_layer.to_numpy(), f"{path}: column 'layer'")
        ids = np.unique(lid)
        if "layer_name" in df.columns:
            names_by_id = df.assign(_l=lid).groupby("_l")["layer_name"].unique()
            bad = [i for i, v in names_by_id.items() if len(v) != 1]
            if bad:
                raise TraceFormatError(f"{path}: layer {bad[0]} has several layer_name values")
            names = [str(names_by_id[i][0]) for i in ids]
        else:
            names = [f"layer{i}" for i in ids]
        li = np.searchsorted(ids, lid)
    else:
        names = list(dict.fromkeys(df["layer"].astype(str)))
        li = pd.Categorical(df["layer"].astype(str), categories=names).codes
    steps = np.unique(df["step"].to_numpy())
    si = np.searchsorted(steps, df["step"].to_numpy())
    ei = df["expert"].to_numpy()
    L = len(names)
    per_layer = np.zeros(L, dtype=np.int64)
    np.maximum.at(per_layer, li, ei + 1)
    if num_experts is not None:
        if per_layer.max() > num_experts:
            raise InputError(f"{path}: expert index {per_layer.max() - 1} >= --num-experts {num_experts}")
        per_layer[:] = num_experts
    ranked = "rank" in df.columns
    R = int(df["rank"].max()) + 1 if ranked else 1
    ri = df["rank"].to_numpy() if ranked else np.zeros(len(df), dtype=np.int64)
    shape = (len(steps), R, L, int(per_layer.max()))
    check_dense(path, shape)
    out = np.zeros(shape, dtype=np.int64)
    out[si, ri, li, ei] = df["count"].to_numpy()
    return Imported(
        steps=steps,
        counts=out,
        layers=names,
        experts_per_layer=per_layer.tolist(),
        top_k=top_k or 1,
        framework="csv",
        ranks_recorded=ranked,
        world_size=R,
        extra={} if top_k else {"top_k_known": False},
    )
