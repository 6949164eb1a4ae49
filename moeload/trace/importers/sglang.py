"""SGLang expert-distribution recorder dumps (`/dump_expert_distribution_record`).

Format (sgl-project/sglang python/sglang/srt/eplb/expert_distribution.py, `_dump_to_file`):
torch.save'd dicts in `SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR`.
- mode "stat" / "stat_approx": `expert_distribution_recorder_{time}.pt` (rank 0) =
  {"rank": 0, "logical_count": int tensor [passes, layers, logical experts] (summed over ranks),
  "average_utilization_rate_over_window": float | None}. Passes are forward passes in buffer order
  (a circular buffer when --expert-distribution-recorder-buffer-size > 0; unused rows are zero).
- mode "per_pass" / "per_token": `expert_distribution_recorder_{time}_{rank}.pt` =
  {"records": [{"forward_pass_id", "rank", "gatherer_key", "global_physical_count": [layers,
  physical experts], ...}], "last_physical_to_logical_map": [layers, physical experts]}.
Physical slots are mapped to logical experts with the map (replicas summed). Steps are forward
passes. Layers that are zero in the whole dump (dense layers) are left out.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from moeload.errors import InputError, TraceFormatError, first_line
from moeload.trace.importers._common import MAX_EXPERTS, MAX_RANKS, Imported, check_dense, counts_array

FILE = re.compile(r"^expert_distribution_recorder_(\d+(?:\.\d+)?)(?:_(\d+))?\.pt$")


def _files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise InputError(f"{src}: no such file or directory")
    found = [(float(m.group(1)), int(m.group(2) or 0), p) for p in src.iterdir() if (m := FILE.match(p.name))]
    if not found:
        raise InputError(f"{src}: no expert_distribution_recorder_*.pt files")
    return [p for _, _, p in sorted(found)]


def _load(path: Path) -> dict[str, Any]:

    import torch

    if path.stat().st_size == 0:
        raise TraceFormatError(f"{path}: empty file; not a torch.save dump")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt pickles raise anything (IndexError, KeyError, struct.error, ...)
        raise TraceFormatError(
            f"{path}: not a readable torch.save file ({type(e).__name__}: {first_line(e)})"
        ) from None
    if not isinstance(obj, dict) or not ({"logical_count"} <= set(obj) or {"records"} <= set(obj)):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise TraceFormatError(
            f"{path}: not an SGLang expert distribution dump (has {keys}; expected 'logical_count' or 'records')"
        )
    return obj


def _np(x: Any, where: str, what: str = "counts") -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return counts_array(x, where, what=what)


def _index(x: Any, where: str) -> int:
    """A scalar id (int or 0-d tensor) -> non-negative int."""
    a = _np(x, where, what="value")
    if a.ndim != 0:
        raise TraceFormatError(f"{where}: expected one integer, got shape {a.shape}")
    return int(a)


def read_sglang(source: str | os.PathLike, *, top_k: int | None = None, keep_empty_layers: bool = False) -> Imported:
    """Read one dump file or a directory of them (all of the same mode)."""
    src = Path(source)
    dumps = [(p, _load(p)) for p in _files(src)]
    modes = {"stat" if "logical_count" in d else "detail" for _, d in dumps}
    if len(modes) > 1:
        raise InputError(f"{src}: mixes 'stat' and per-pass dumps; import them separately")
    if modes == {"stat"}:
        steps, counts, R, extra = _stat(dumps)
    else:
        steps, counts, R, extra = _detail(dumps)
    S, _, L, E = counts.shape
    layer_ids = np.arange(L)
    if not keep_empty_layers:
        layer_ids = np.flatnonzero(counts.sum(axis=(0, 1, 3)) > 0)
        if len(layer_ids) == 0:
            raise InputError(f"{src}: every layer has zero counts")
        counts = counts[:, :, layer_ids]
    return Imported(
        steps=steps,
        counts=counts,
        layers=[f"model.layers.{i}.mlp" for i in layer_ids],
        experts_per_layer=[E] * len(layer_ids),
        top_k=top_k or 1,
        framework="sglang",
        ranks_recorded=R > 1,
        world_size=R,
        extra={
            "source_format": f"sglang expert distribution ({modes.pop()})",
            "sglang_layer_ids": layer_ids.tolist(),
            **extra,
            **({} if top_k else {"top_k_known": False}),
        },
    )


def _stat(dumps: list[tuple[Path, dict]]):
    blocks: list[np.ndarray] = []
    rates: list[Any] = []
    for path, d in dumps:
        c = _np(d["logical_count"], f"{path}: logical_count")
        if c.ndim != 3:
            raise TraceFormatError(f"{path}: logical_count must be [passes, layers, experts], got {c.shape}")
        if blocks and c.shape[1:] != blocks[0].shape[1:]:
            raise TraceFormatError(f"{path}: logical_count shape {c.shape} differs from {dumps[0][0]}")
        blocks.append(c)
        rate = d.get("average_utilization_rate_over_window")
        if (
            rate is not None
            and not isinstance(rate, (int, float))
            and not (hasattr(rate, "numel") and rate.numel() == 1)
        ):
            raise TraceFormatError(
                f"{path}: average_utilization_rate_over_window must be a number, got {type(rate).__name__}"
            )
        rates.append(rate)
    c = np.concatenate(blocks)
    steps = np.arange(len(c), dtype=np.int64)
    used = c.sum(axis=(1, 2)) > 0
    extra = {
        "passes_in_buffer": int(len(c)),
        "empty_passes_dropped": int((~used).sum()),
        "note": "steps are buffer positions; a circular buffer that wrapped is not in time order",
    }
    if any(r is not None for r in rates):
        extra["average_utilization_rate_over_window"] = [None if r is None else float(r) for r in rates]
    return steps[used], c[used][:, None], 1, extra


def _detail(dumps: list[tuple[Path, dict]]):
    acc: dict[tuple[int, int], np.ndarray] = {}
    L: int | None = None
    E: int | None = None
    for path, d in dumps:
        recs = d["records"]
        if not isinstance(recs, list):
            raise TraceFormatError(f"{path}: 'records' must be a list")
        if "last_physical_to_logical_map" not in d:
            raise TraceFormatError(f"{path}: missing 'last_physical_to_logical_map'")
        p2l = _np(d["last_physical_to_logical_map"], f"{path}: last_physical_to_logical_map", what="expert ids")
        if p2l.ndim != 2 or p2l.size == 0:
            raise TraceFormatError(
                f"{path}: last_physical_to_logical_map must be [layers, physical experts], got {p2l.shape}"
            )
        if p2l.max() >= MAX_EXPERTS:
            raise TraceFormatError(
                f"{path}: last_physical_to_logical_map holds expert {p2l.max()} (limit {MAX_EXPERTS})"
            )
        n_log = int(p2l.max()) + 1
        if L is None or E is None:  # (set together)
            L, E = p2l.shape[0], n_log
        elif (p2l.shape[0], n_log) != (L, E):
            raise TraceFormatError(
                f"{path}: {p2l.shape[0]} layers x {n_log} experts differs from earlier files ({L} x {E})"
            )
        for i, r in enumerate(recs):
            where = f"{path}: records[{i}]"
            if not isinstance(r, dict) or "global_physical_count" not in r or "forward_pass_id" not in r:
                raise TraceFormatError(f"{where}: needs 'forward_pass_id' and 'global_physical_count'")
            g = _np(r["global_physical_count"], f"{where}.global_physical_count")
            if g.shape != p2l.shape:
                raise TraceFormatError(f"{where}: global_physical_count {g.shape} does not match the map {p2l.shape}")
            logical = np.zeros((L, E), dtype=np.int64)
            np.add.at(logical, (np.arange(L)[:, None], p2l), g)
            key = (_index(r["forward_pass_id"], f"{where}.forward_pass_id"), _index(r.get("rank", 0), f"{where}.rank"))
            if key[1] >= MAX_RANKS:
                raise TraceFormatError(f"{where}: rank {key[1]} is implausible (limit {MAX_RANKS})")
            acc[key] = acc.get(key, 0) + logical
    if not acc or L is None or E is None:  # (L, E are set where acc is)
        raise InputError(f"{dumps[0][0]}: no records")
    steps = sorted({s for s, _ in acc})
    R = max(r for _, r in acc) + 1
    pos = {s: i for i, s in enumerate(steps)}
    check_dense(dumps[0][0], (len(steps), R, L, E))
    out = np.zeros((len(steps), R, L, E), dtype=np.int64)
    for (s, r), v in acc.items():
        out[pos[s], r] = v
    return np.asarray(steps, dtype=np.int64), out, R, {}
