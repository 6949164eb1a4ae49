"""open_trace / Trace: dense, sliced reads of a trace directory without loading all of it."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moeload.errors import TraceFormatError, clip
from moeload.trace.checks import checked_sum, list_lengths, read_columns, reading, rows_problem
from moeload.trace.index import SKIP_HINT, _Part, _ranges  # noqa: F401  (re-exported: defined here before)
from moeload.trace.select import LayerSel, StepSel, TraceSelection
from moeload.trace.writer import MICRO_DIR


def shares(counts: np.ndarray) -> np.ndarray:
    """counts [..., E] -> float64 share of each expert; rows sum to 1, NaN where a row has no tokens."""
    c = np.asarray(counts).astype(np.float64)
    tot = c.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, c / np.where(tot > 0, tot, 1), np.nan)


def open_trace(path: str | os.PathLike, *, skip_bad_parts: bool = False) -> Trace:
    """Open a trace directory written by moeload (or an importer). Reads only the manifest now.

    A part that cannot be read or does not match the manifest makes every read that touches its
    step range raise TraceFormatError naming it; the rest of the trace stays readable. With
    skip_bad_parts=True every part is checked in full on the first read, bad parts are left out
    with one warning and listed in `trace.bad_parts`, and their steps show up in `gaps()`.
    """
    return Trace(path, skip_bad_parts=skip_bad_parts)


class Trace(TraceSelection):
    """A trace on disk. Arrays come back dense: counts [S, L, E] int64, global over ranks.

    Step selections (`steps=`): None (all), a (start, stop) tuple or slice of step numbers
    (stop exclusive; a slice's stride keeps the recorded steps among start, start + stride, ...,
    counting from 0 when start is None), a range, or an explicit array of step numbers. Layer
    selections (`layers=`): None, an index or module path, or a list of them. Step and layer
    numbers are Python or NumPy integers: a float or bool raises InputError, never truncated.
    Layers with fewer experts than the widest layer are zero-padded.
    """

    def __repr__(self) -> str:
        return (
            f"Trace({str(self.path)!r}, steps={len(self.steps)}, layers={self.num_layers}, "
            f"experts={self.num_experts}, framework={self.manifest.framework!r})"
        )

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
            t = read_columns(part.path, ["step", "layer", "rank", column], filt or None)
            problem = rows_problem(m, t)
            if problem:
                raise TraceFormatError(f"{part.path}: {problem} (steps {part.first}..{part.last}{SKIP_HINT})")
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
                vals = _dense_lists(col, E)
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
                n = int(np.diff(np.r_[starts, len(key)]).max())

                def add(x: np.ndarray, at: np.ndarray = starts) -> np.ndarray:
                    return np.add.reduceat(x, at, axis=0)

                summed = checked_sum(vals, add, n)
                if summed is None:
                    raise TraceFormatError(
                        f"{part.path}: {column} counts summed over ranks exceed int64 "
                        f"(steps {part.first}..{part.last}{SKIP_HINT})"
                    )
                vals = summed
                si, li, ri = key[starts] // len(lay), key[starts] % len(lay), np.zeros(len(starts), np.int64)
            out[si, ri, li] = vals
        if inverse is not None:
            sel_steps, out = sel_steps[inverse], out[inverse]
        return sel_steps, (out if per_rank else out[:, 0])

    def counts(
        self, steps: StepSel = None, layers: LayerSel = None, *, kind: str = "routed", split: str = "train"
    ) -> np.ndarray:
        """[S, L, E] int64 global counts (summed over ranks). kind: 'routed' or 'kept'."""
        if kind not in ("routed", "kept"):
            raise ValueError(f"kind must be 'routed' or 'kept', got {kind!r}")
        return self._gather(steps, layers, split, kind, per_rank=False)[1]

    def proportions(
        self, steps: StepSel = None, layers: LayerSel = None, *, kind: str = "routed", split: str = "train"
    ) -> np.ndarray:
        """[S, L, E] float64 share of each expert; rows sum to 1, NaN where a row has no tokens."""
        return shares(self.counts(steps, layers, kind=kind, split=split))

    def rank_counts(
        self, steps: StepSel = None, layers: LayerSel = None, *, kind: str = "routed", split: str = "train"
    ) -> np.ndarray:
        """[S, R, L, E] int64 counts routed by each rank's own tokens (traces with ranks_recorded)."""
        return self._gather(steps, layers, split, kind, per_rank=True)[1]

    def tokens(self, steps: StepSel = None, layers: LayerSel = None, *, split: str = "train") -> np.ndarray:
        """[S, L] tokens that reached each router in each step, summed over ranks."""
        return self._gather(steps, layers, split, "tokens", per_rank=False)[1]

    def micro_batch_counts(
        self, steps: StepSel = None, layers: LayerSel = None, *, per_rank: bool = False
    ) -> np.ndarray:
        """[S, M, L, E] int64 routed counts of each micro-batch (summed over ranks), or [S, R, M, L, E]
        with per_rank, for traces recorded with LoadTracer(per_micro_batch=True): micro-batch m of a
        step is the m-th training forward of each gate in it. M: the most micro-batches (that saw
        tokens) of a step in the selection; steps with fewer have zero rows after theirs. Summed over M, the counts equal
        `counts()` (`rank_counts()`). Raises TraceFormatError for steps without micro-batch rows (a
        trace recorded without it, rows lost, or past extra.micro_batches_stopped)."""
        m = self.manifest
        extra = m.extra if isinstance(m.extra, dict) else {}
        if not extra.get("per_micro_batch"):
            raise TraceFormatError(f"{self.path}: recorded without micro-batch rows (LoadTracer(per_micro_batch=True))")
        if per_rank and not m.ranks_recorded:
            raise TraceFormatError(f"{self.path}: this trace holds global counts only (ranks_recorded is false)")
        sel_steps, owner = self._select_steps(steps, "train")
        lay = self._select_layers(layers)
        lay_pos = np.full(self.num_layers, -1)
        lay_pos[lay] = np.arange(len(lay))
        R, E = (m.world_size if per_rank else 1), self.num_experts
        stop, lost = extra.get("micro_batches_stopped"), extra.get("micro_lost")
        why = (
            f"micro-batch rows stopped at step {stop.get('step')}: {stop.get('reason')}"
            if isinstance(stop, dict)
            else f"lost: {lost}"
            if lost
            else None
        )
        pieces = []
        for pi in np.unique(owner):
            part = self._parts[pi]
            mine = sel_steps[owner == pi]
            mp = self.path / MICRO_DIR / part.path.name
            if not mp.exists():
                raise TraceFormatError(
                    f"{mp}: missing: steps {part.first}..{part.last} have no micro-batch rows"
                    + (f" ({clip(why, 160)})" if why else "")
                )
            t = read_columns(
                mp,
                ["step", "micro_batch", "layer", "rank", "tokens", "routed"],
                [("step", ">=", int(mine.min())), ("step", "<=", int(mine.max()))],
            )
            st, mb, lyr, rk = (t.column(c).to_numpy() for c in ("step", "micro_batch", "layer", "rank"))
            if len(st) and (
                lyr.min() < 0
                or lyr.max() >= self.num_layers
                or mb.min() < 0
                or mb.max() >= 4096
                or rk.max() >= m.world_size
            ):
                raise TraceFormatError(f"{mp}: layer, micro_batch or rank ids out of range{SKIP_HINT}")
            absent = np.setdiff1d(mine, st)
            if len(absent):
                raise TraceFormatError(
                    f"{mp}: no micro-batch rows for step(s) {absent[:5].tolist()}"
                    + (f" ({clip(why, 160)})" if why else "")
                )
            rows = np.isin(st, mine) & (lay_pos[lyr] >= 0)
            vals = _dense_lists(t.column("routed").filter(pa.array(rows)), E)
            tok = t.column("tokens")
            used = (vals.sum(-1) > 0) if tok.null_count else tok.to_numpy()[rows] > 0  # imports: tokens unknown
            pieces.append(
                (
                    np.searchsorted(sel_steps, st[rows]),
                    mb[rows],
                    lay_pos[lyr[rows]],
                    np.maximum(rk[rows], 0) if per_rank else np.zeros(int(rows.sum()), np.int64),
                    vals,
                    used,
                )
            )
        M = max([int(p[1][p[5]].max()) + 1 for p in pieces if p[5].any()], default=1)  # micro-batches that saw tokens
        out = np.zeros((len(sel_steps), R, M, len(lay), E), np.int64)
        for si, mb, li, ri, vals, _ in pieces:
            keep = mb < M
            np.add.at(out, (si[keep], ri[keep], mb[keep], li[keep]), vals[keep])
        return out if per_rank else out[:, 0]

    def router_bias(self, steps: StepSel = None, layers: LayerSel = None) -> np.ndarray | None:
        """[S, L, E] float64 expert bias each router routed with in each step (aux-loss-free routing:
        megatron-core expert_bias, torchtitan expert_bias, DeepSeek-V3 e_score_correction_bias), as
        the tracer read it before the step's first forward; NaN for layers without one (and for
        steps written by a session that recorded none). None where the trace records no bias."""
        extra = self.manifest.extra if isinstance(self.manifest.extra, dict) else {}
        if not extra.get("router_bias_layers"):
            return None
        sel_steps, owner = self._select_steps(steps, "train")
        lay = self._select_layers(layers)
        out = np.full((len(sel_steps), len(lay), self.num_experts), np.nan)
        lay_pos = np.full(self.num_layers, -1)
        lay_pos[lay] = np.arange(len(lay))
        for pi in np.unique(owner):
            part = self._parts[pi]
            with reading(part.path), pq.ParquetFile(part.path) as pf:
                if "bias" not in pf.schema_arrow.names:
                    continue
            mine = sel_steps[owner == pi]
            t = read_columns(
                part.path, ["step", "layer", "bias"], [("step", ">=", int(mine.min())), ("step", "<=", int(mine.max()))]
            )
            s, lyr = t.column("step").to_numpy(), t.column("layer").to_numpy()
            if len(lyr) and (lyr.min() < 0 or lyr.max() >= self.num_layers):
                raise TraceFormatError(f"{part.path}: layer ids outside 0..{self.num_layers - 1}{SKIP_HINT}")
            rows = np.isin(s, mine) & (lay_pos[lyr] >= 0)
            col = t.column("bias").filter(pa.array(rows))
            lengths, _, _ = list_lengths(col)
            if len(lengths) and (lengths.max() > self.num_experts):
                raise TraceFormatError(f"{part.path}: a bias row holds more than {self.num_experts} values{SKIP_HINT}")
            dense = _dense_lists(col, self.num_experts, fill=np.nan, dtype=np.float64)
            out[np.searchsorted(sel_steps, s[rows]), lay_pos[lyr[rows]]] = dense
        return out

    def gpu_loads(
        self, steps: StepSel = None, layers: LayerSel = None, *, kind: str = "routed", split: str = "train"
    ) -> np.ndarray:
        """[S, L, G] tokens processed by each expert-parallel rank under the expert->rank map in force
        at each step: the recorded initial map, then each change in `rank_map_changes` from its step on."""
        lay = self._select_layers(layers)
        if kind not in ("routed", "kept"):
            raise ValueError(f"kind must be 'routed' or 'kept', got {kind!r}")
        sel, c = self._gather(steps, lay, split, kind, per_rank=False)
        G = self.manifest.ep_size
        out = np.zeros(c.shape[:2] + (G,), dtype=np.int64)
        for j, li in enumerate(lay):
            which, maps = self.manifest.map_at(int(li), sel)
            for k in np.unique(which):
                rows = which == k
                r = np.asarray(maps[k])
                for g in range(G):
                    mine = c[rows, j, : len(r)][:, r == g]
                    load = checked_sum(mine, lambda x: x.sum(-1), mine.shape[-1])
                    if load is None:
                        raise TraceFormatError(
                            f"{self.path}: the load of rank {g} in layer {self.layers[li]!r} exceeds int64"
                        )
                    out[rows, j, g] = load
        return out

    def iter_blocks(self, block: int = 1000, layers: LayerSel = None, *, kind: str = "routed", split: str = "train"):
        """Yield (steps [b], counts [b, L, E]) in blocks of `block` steps, for traces too big to hold."""
        all_steps = self.steps_of(split)
        for i in range(0, len(all_steps), block):
            sel = all_steps[i : i + block]
            yield sel, self.counts(sel, layers, kind=kind, split=split)

    def to_pandas(
        self, steps: StepSel = None, layers: LayerSel = None, *, per_rank: bool = False, split: str = "train"
    ):
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


def _dense_lists(col: pa.ChunkedArray | pa.ListArray, E: int, *, fill: float = 0, dtype: type = np.int64) -> np.ndarray:
    """list column whose rows were checked (rows_problem, or lengths <= E) -> [N, E] of `dtype`,
    padded with `fill` (counts: int64 and 0; the bias column: float64 and NaN)."""
    lengths, vals, _ = list_lengths(col)
    n = len(lengths)
    if n and np.all(lengths == E):
        return vals.reshape(n, E).astype(dtype, copy=False)
    out: np.ndarray = np.full((n, E), fill, dtype=dtype)
    starts = np.cumsum(lengths) - lengths
    rows = np.repeat(np.arange(n), lengths)
    out[rows, np.arange(len(vals)) - np.repeat(starts, lengths)] = vals
    return out


__all__ = ["Trace", "open_trace"]
