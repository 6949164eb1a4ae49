"""open_trace / Trace: dense, sliced reads of a trace directory without loading all of it."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moeload.errors import TraceFormatError
from moeload.trace.manifest import PARTS_DIR, Manifest, read_manifest
from moeload.trace.writer import PART_RE

StepSel = None | slice | range | tuple[int, int] | Sequence[int] | np.ndarray
LayerSel = None | int | str | Sequence[int | str]


@dataclasses.dataclass(frozen=True)
class _Part:
    path: Path
    seq: int
    writer_rank: int
    split: str
    first: int
    last: int


def open_trace(path: str | os.PathLike) -> Trace:
    """Open a trace directory written by moeload (or an importer). Reads only the manifest now."""
    return Trace(path)


class Trace:
    """A trace on disk. Arrays come back dense: counts [S, L, E] int64, global over ranks.

    Step selections (`steps=`): None (all), a (start, stop) tuple or slice of step numbers
    (stop exclusive), a range, or an explicit array of step numbers. Layer selections
    (`layers=`): None, an index or module path, or a list of them. Layers with fewer experts
    than the widest layer are zero-padded.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.manifest: Manifest = read_manifest(self.path)
        pdir = self.path / PARTS_DIR
        parts: list[_Part] = []
        if pdir.is_dir():
            for p in sorted(pdir.iterdir()):
                m = PART_RE.match(p.name)
                if m:
                    parts.append(
                        _Part(p, int(m.group(1)), int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5)))
                    )
        self._parts = sorted(parts, key=lambda q: (q.seq, q.writer_rank))

    # ---- metadata ---------------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.to_dict()

    @property
    def layers(self) -> list[str]:
        return list(self.manifest.layers)

    @property
    def num_layers(self) -> int:
        return self.manifest.num_layers

    @property
    def num_experts(self) -> int:
        return self.manifest.num_experts

    @property
    def experts_per_layer(self) -> list[int]:
        return list(self.manifest.experts_per_layer)

    @property
    def top_k(self) -> list[int]:
        return list(self.manifest.top_k)

    @property
    def parts(self) -> list[Path]:
        return [p.path for p in self._parts]

    @property
    def splits(self) -> list[str]:
        return sorted({p.split for p in self._parts})

    @property
    def size_bytes(self) -> int:
        return sum(p.path.stat().st_size for p in self._parts)

    def __repr__(self) -> str:
        return (
            f"Trace({str(self.path)!r}, steps={len(self.steps)}, layers={self.num_layers}, "
            f"experts={self.num_experts}, framework={self.manifest.framework!r})"
        )

    # ---- step index -------------------------------------------------------------------------
    def _read(self, part: _Part, columns: list[str], filt: Any = None) -> pa.Table:
        try:
            return pq.read_table(part.path, columns=columns, filters=filt)
        except (pa.ArrowInvalid, OSError) as e:
            raise TraceFormatError(f"{part.path}: unreadable Parquet part ({str(e).splitlines()[0]})") from None
        except KeyError as e:
            raise TraceFormatError(f"{part.path}: missing column {e}") from None

    @cached_property
    def _owner(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per split: (steps [S] sorted, owning part index [S]); later parts replace earlier ones."""
        out = {}
        for split in {p.split for p in self._parts}:
            steps_all, owner_all = [], []
            for i, part in enumerate(self._parts):
                if part.split != split:
                    continue
                s = np.unique(self._read(part, ["step"]).column("step").to_numpy())
                if len(s) and (s.min() < part.first or s.max() > part.last):
                    raise TraceFormatError(f"{part.path}: steps {s.min()}..{s.max()} outside the range in its name")
                steps_all.append(s)
                owner_all.append(np.full(len(s), i))
            s = np.concatenate(steps_all)
            o = np.concatenate(owner_all)
            order = np.lexsort((o, s))  # by step, then part order; keep the last of each step
            s, o = s[order], o[order]
            last = np.r_[s[1:] != s[:-1], True]
            out[split] = (s[last], o[last])
        return out

    def steps_of(self, split: str = "train") -> np.ndarray:
        """[S] recorded step numbers of one split, sorted."""
        if split not in self._owner:
            return np.zeros(0, dtype=np.int64)
        return self._owner[split][0].copy()

    @property
    def steps(self) -> np.ndarray:
        """[S] recorded training step numbers, sorted."""
        return self.steps_of("train")

    def gaps(self, split: str = "train") -> list[tuple[int, int]]:
        """Missing step ranges (first, last inclusive) between the first and last recorded step."""
        s = self.steps_of(split)
        if len(s) < 2:
            return []
        jump = np.flatnonzero(np.diff(s) > 1)
        return [(int(s[i]) + 1, int(s[i + 1]) - 1) for i in jump]

    # ---- selections -------------------------------------------------------------------------
    def _select_steps(self, steps: StepSel, split: str) -> tuple[np.ndarray, np.ndarray]:
        all_steps, owner = self._owner.get(split, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        if steps is None:
            keep = np.ones(len(all_steps), bool)
        elif isinstance(steps, (tuple, slice)) and not isinstance(steps, np.ndarray):
            start, stop = (steps.start, steps.stop) if isinstance(steps, slice) else steps
            keep = np.ones(len(all_steps), bool)
            if start is not None:
                keep &= all_steps >= start
            if stop is not None:
                keep &= all_steps < stop
        else:
            want = np.asarray(list(steps) if isinstance(steps, range) else steps, dtype=np.int64).reshape(-1)
            missing = np.setdiff1d(want, all_steps)
            if len(missing):
                raise TraceFormatError(
                    f"{self.path}: step(s) {missing[:5].tolist()} not recorded (have {len(all_steps)} steps"
                    + (f", {all_steps[0]}..{all_steps[-1]})" if len(all_steps) else ")")
                )
            idx = np.searchsorted(all_steps, want)
            return all_steps[idx], owner[idx]
        return all_steps[keep], owner[keep]

    def _select_layers(self, layers: LayerSel) -> np.ndarray:
        if layers is None:
            return np.arange(self.num_layers)
        if isinstance(layers, (int, np.integer, str)):
            layers = [layers]
        out = []
        for x in layers:
            if isinstance(x, str):
                if x not in self.manifest.layers:
                    raise TraceFormatError(f"{self.path}: no layer named {x!r}; layers are {self.layers}")
                out.append(self.manifest.layers.index(x))
            else:
                i = int(x)
                if not -self.num_layers <= i < self.num_layers:
                    raise TraceFormatError(f"{self.path}: layer index {i} out of range (trace has {self.num_layers})")
                out.append(i % self.num_layers)
        return np.asarray(out, dtype=np.int64)

    # ---- dense reads ------------------------------------------------------------------------
    def _gather(
        self, steps: StepSel, layers: LayerSel, split: str, column: str, per_rank: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """-> (steps [S], array [S, R, L, E] or [S, L, E]) for a list column, or [S, (R,) L] for tokens."""
        m = self.manifest
        sel_steps, owner = self._select_steps(steps, split)
        inverse = None
        if len(sel_steps) > 1 and not np.all(sel_steps[1:] > sel_steps[:-1]):
            sel_steps, first, inverse = np.unique(sel_steps, return_index=True, return_inverse=True)
            owner = owner[first]
        lay = self._select_layers(layers)
        if per_rank and not m.ranks_recorded:
            raise TraceFormatError(f"{self.path}: this trace holds global counts only (ranks_recorded is false)")
        R = m.world_size if per_rank else 1
        is_list = column in ("routed", "kept")
        E = self.num_experts
        shape = (len(sel_steps), R, len(lay)) + ((E,) if is_list else ())
        out = np.zeros(shape, dtype=np.int64)
        if column == "kept" and m.count_kind == "routed":
            raise TraceFormatError(f"{self.path}: this trace records routed counts only (count_kind 'routed')")
        lay_pos = np.full(self.num_layers, -1)
        lay_pos[lay] = np.arange(len(lay))
        for pi in np.unique(owner):
            part = self._parts[pi]
            mine = sel_steps[owner == pi]
            filt = []
            if mine.min() > part.first or mine.max() < part.last:
                filt += [("step", ">=", int(mine.min())), ("step", "<=", int(mine.max()))]
            if len(lay) < self.num_layers:
                filt.append(("layer", "in", lay.tolist()))
            t = self._read(part, ["step", "layer", "rank", column], filt or None)
            s = t.column("step").to_numpy()
            lyr = t.column("layer").to_numpy()
            rows = np.isin(s, mine) & (lay_pos[lyr] >= 0)
            if not rows.all():
                t = t.filter(pa.array(rows))
                s, lyr = s[rows], lyr[rows]
            si = np.searchsorted(sel_steps, s)
            li = lay_pos[lyr]
            rk = t.column("rank").to_numpy()
            ri = np.maximum(rk, 0) if per_rank else np.zeros_like(rk)
            col = t.column(column)
            if is_list:
                vals = _dense_lists(col, E, part.path)
            else:
                if col.null_count:
                    raise TraceFormatError(f"{part.path}: column {column!r} is not recorded in this trace")
                vals = col.to_numpy().astype(np.int64)
            if not per_rank and np.any(rk >= 0) and m.world_size > 1:
                # several rank rows per (step, layer): sum them with one sorted reduction
                key = si * len(lay) + li
                order = np.argsort(key, kind="stable")
                key, vals = key[order], vals[order]
                starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
                vals = np.add.reduceat(vals, starts, axis=0)
                si, li, ri = key[starts] // len(lay), key[starts] % len(lay), np.zeros(len(starts), np.int64)
            out[si, ri, li] = vals
        if inverse is not None:
            sel_steps, out = sel_steps[inverse], out[inverse]
        return sel_steps, (out if per_rank else out[:, 0])

    def counts(self, steps: StepSel = None, layers: LayerSel = None, *, kind: str = "routed", split: str = "train") -> np.ndarray:
        """[S, L, E] int64 global counts (summed over ranks). kind: 'routed' or 'kept'."""
        if kind not in ("routed", "kept"):
            raise ValueError(f"kind must be 'routed' or 'kept', got {kind!r}")
        return self._gather(steps, layers, split, kind, per_rank=False)[1]

    def proportions(self, steps: StepSel = None, layers: LayerSel = None, *, kind: str = "routed", split: str = "train") -> np.ndarray:
        """[S, L, E] float64 share of each expert; rows sum to 1, NaN where a row has no tokens."""
        c = self.counts(steps, layers, kind=kind, split=split).astype(np.float64)
        tot = c.sum(-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(tot > 0, c / np.where(tot > 0, tot, 1), np.nan)

    def rank_counts(self, steps: StepSel = None, layers: LayerSel = None, *, kind: str = "routed", split: str = "train") -> np.ndarray:
        """[S, R, L, E] int64 counts routed by each rank's own tokens (traces with ranks_recorded)."""
        return self._gather(steps, layers, split, kind, per_rank=True)[1]

    def tokens(self, steps: StepSel = None, layers: LayerSel = None, *, split: str = "train") -> np.ndarray:
        """[S, L] tokens that reached each router in each step, summed over ranks."""
        return self._gather(steps, layers, split, "tokens", per_rank=False)[1]

    def gpu_loads(self, steps: StepSel = None, layers: LayerSel = None, *, kind: str = "routed", split: str = "train") -> np.ndarray:
        """[S, L, G] tokens processed by each expert-parallel rank under the recorded expert->rank map."""
        lay = self._select_layers(layers)
        c = self.counts(steps, lay, kind=kind, split=split)
        rmap = self.manifest.rank_map()
        G = self.manifest.ep_size
        out = np.zeros(c.shape[:2] + (G,), dtype=np.int64)
        for j, li in enumerate(lay):
            r = np.asarray(rmap[li])
            for g in range(G):
                out[:, j, g] = c[:, j, : len(r)][:, r == g].sum(-1)
        return out

    def iter_blocks(self, block: int = 1000, layers: LayerSel = None, *, kind: str = "routed", split: str = "train"):
        """Yield (steps [b], counts [b, L, E]) in blocks of `block` steps, for traces too big to hold."""
        all_steps = self.steps_of(split)
        for i in range(0, len(all_steps), block):
            sel = all_steps[i : i + block]
            yield sel, self.counts(sel, layers, kind=kind, split=split)

    def to_pandas(self, steps: StepSel = None, layers: LayerSel = None, *, per_rank: bool = False, split: str = "train"):
        """Tidy DataFrame: step, layer, layer_name, expert, count (+ kept where recorded, + rank)."""
        import pandas as pd

        lay = self._select_layers(layers)
        kept = self.manifest.count_kind != "routed"
        sel, c = self._gather(steps, lay, split, "routed", per_rank=per_rank)
        k = self._gather(steps, lay, split, "kept", per_rank=per_rank)[1] if kept else None
        if not per_rank:
            c = c[:, None]
            k = k[:, None] if k is not None else None
        S, R, L, E = c.shape
        idx = np.indices((S, R, L, E)).reshape(4, -1)
        valid = idx[3] < np.asarray(self.experts_per_layer)[lay][idx[2]]
        idx = idx[:, valid]
        df = pd.DataFrame(
            {
                "step": sel[idx[0]],
                "layer": lay[idx[2]],
                "layer_name": pd.Categorical.from_codes(idx[2], [self.layers[i] for i in lay]),
                "expert": idx[3],
                "count": c.reshape(-1)[valid],
            }
        )
        if per_rank:
            df.insert(1, "rank", idx[1])
        if k is not None:
            df["kept"] = k.reshape(-1)[valid]
        return df


def _dense_lists(col: pa.ChunkedArray | pa.ListArray, E: int, where: Path) -> np.ndarray:
    """list<int> column -> [N, E] int64, zero-padded where a row is shorter than E."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    if any(c.null_count for c in chunks):
        raise TraceFormatError(f"{where}: a count list is null")
    lengths = np.concatenate([np.diff(c.offsets.to_numpy()) for c in chunks]) if chunks else np.zeros(0, np.int64)
    vals = np.concatenate([c.flatten().to_numpy(zero_copy_only=False) for c in chunks]) if chunks else np.zeros(0)
    n = len(lengths)
    if n and np.all(lengths == E):
        return vals.reshape(n, E).astype(np.int64, copy=False)
    if np.any(lengths > E):
        raise TraceFormatError(f"{where}: a row has {lengths.max()} experts, manifest says at most {E}")
    out = np.zeros((n, E), dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    rows = np.repeat(np.arange(n), lengths)
    out[rows, np.arange(len(vals)) - np.repeat(starts, lengths)] = vals
    return out


__all__ = ["Trace", "open_trace"]
