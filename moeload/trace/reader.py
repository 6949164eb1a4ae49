"""open_trace / Trace: dense, sliced reads of a trace directory without loading all of it."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moeload.errors import InputError, TraceFormatError, clip
from moeload.trace.checks import (
    I64_MAX,
    check_part,
    checked_sum,
    index_part,
    list_lengths,
    read_columns,
    reading,
    rows_problem,
)
from moeload.trace.manifest import PARTS_DIR, Manifest, read_manifest
from moeload.trace.writer import MICRO_DIR, PART_RE

SKIP_HINT = "; open_trace(..., skip_bad_parts=True) or --skip-bad-parts reads the other parts"
StepSel = None | slice | range | tuple[int, int] | Sequence[int] | np.ndarray
LayerSel = None | int | str | Sequence[int | str] | np.ndarray


@dataclasses.dataclass(frozen=True)
class _Part:
    path: Path
    seq: int
    writer_rank: int
    split: str
    first: int
    last: int


def open_trace(path: str | os.PathLike, *, skip_bad_parts: bool = False) -> Trace:
    """Open a trace directory written by moeload (or an importer). Reads only the manifest now.

    A part that cannot be read or does not match the manifest makes every read that touches its
    step range raise TraceFormatError naming it; the rest of the trace stays readable. With
    skip_bad_parts=True every part is checked in full on the first read, bad parts are left out
    with one warning and listed in `trace.bad_parts`, and their steps show up in `gaps()`.
    """
    return Trace(path, skip_bad_parts=skip_bad_parts)


class Trace:
    """A trace on disk. Arrays come back dense: counts [S, L, E] int64, global over ranks.

    Step selections (`steps=`): None (all), a (start, stop) tuple or slice of step numbers
    (stop exclusive; a slice's stride keeps the recorded steps among start, start + stride, ...,
    counting from 0 when start is None), a range, or an explicit array of step numbers. Layer
    selections (`layers=`): None, an index or module path, or a list of them. Step and layer
    numbers are Python or NumPy integers: a float or bool raises InputError, never truncated.
    Layers with fewer experts than the widest layer are zero-padded.
    """

    def __init__(self, path: str | os.PathLike, *, skip_bad_parts: bool = False) -> None:
        self.path = Path(path)
        self.skip_bad_parts = bool(skip_bad_parts)
        self._stale: dict[str, list[tuple[int, int]]] = {}
        self.manifest: Manifest = read_manifest(self.path)
        pdir = self.path / PARTS_DIR
        parts: list[_Part] = []
        self._misnamed: list[tuple[Path, str]] = []  # parts whose name numbers exceed int64
        if pdir.is_dir():
            for p in sorted(pdir.iterdir()):
                m = PART_RE.match(p.name)
                if not m:
                    continue
                seq, rank, first, last = (int(m.group(i)) for i in (1, 2, 4, 5))
                if max(seq, rank, first, last) > I64_MAX:
                    why = "a sequence number, writer rank or step in its file name is beyond int64"
                    if not self.skip_bad_parts:
                        raise TraceFormatError(f"{p}: {why}{SKIP_HINT}")
                    self._misnamed.append((p, why))
                    continue
                parts.append(_Part(p, seq, rank, m.group(3), first, last))
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
        return list(cast(list[int], self.manifest.top_k))  # a list once the manifest is checked

    @property
    def parts(self) -> list[Path]:
        return [p.path for p in self._parts] + [p for p, _ in self._misnamed]

    @property
    def bad_parts(self) -> list[tuple[Path, str]]:
        """(path, problem) of each part that cannot be read or does not match the manifest.

        Complete with skip_bad_parts=True; otherwise only what the quick checks (footer, step
        column, row count) found.
        """
        return self._misnamed + [(self._parts[i].path, why) for i, why in sorted(self._index[1].items())]

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
    @cached_property
    def _index(self) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[int, str]]:
        """({split: (steps [S] sorted, owning part index [S])}, {bad part index: problem}).

        Later parts replace earlier ones step by step; a bad part still claims the range in its
        name, so older copies of those steps do not reappear when it is skipped.
        """
        check = check_part if self.skip_bad_parts else index_part
        found: dict[str, list[tuple[np.ndarray, int]]] = {}
        bad: dict[int, str] = {}
        for i, part in enumerate(self._parts):
            try:
                s = check(part.path, self.manifest, part.first, part.last, part.split)
            except TraceFormatError as e:
                bad[i] = str(e).removeprefix(f"{part.path}: ")
                continue
            found.setdefault(part.split, []).append((s, i))
        out = {}
        part_seq = np.array([p.seq for p in self._parts], dtype=np.int64)
        part_rank = np.array([p.writer_rank for p in self._parts], dtype=np.int64)
        for split, items in found.items():
            s = np.concatenate([x for x, _ in items])
            o = np.concatenate([np.full(len(x), i) for x, i in items])
            order = np.lexsort((o, s))  # by step, then part order; keep the last of each step
            s, o = s[order], o[order]
            last = np.r_[s[1:] != s[:-1], True]
            s, o = s[last], o[last]
            for bi in bad:
                b = self._parts[bi]
                if b.split == split:
                    keep = ~((s >= b.first) & (s <= b.last) & (o < bi))
                    s, o = s[keep], o[keep]
            stale = np.zeros(len(s), dtype=bool)
            restarts = [r for r in self._restarts if r[2] == split]
            if restarts:
                seq, wr = part_seq[o], part_rank[o]
                for first_seq, rank, _, restart in restarts:
                    stale |= (seq < first_seq) & (wr == rank) & (s >= restart)
            self._stale[split] = _ranges(s[stale])
            out[split] = (s[~stale], o[~stale])
        skipped = [(p.name, why) for p, why in self._misnamed] + [(self._parts[i].path.name, why) for i, why in sorted(bad.items())]
        if skipped and self.skip_bad_parts:
            listed = "; ".join(f"{name} ({why})" for name, why in skipped)
            warnings.warn(f"{self.path}: skipped {len(skipped)} bad part(s): {listed}", stacklevel=4)
        return out, bad

    @property
    def _owner(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return self._index[0]

    @cached_property
    def _restarts(self) -> list[tuple[int, int, str, int]]:
        """[(first_seq, writer_rank, split, restart step)] of every later session that wrote a part.

        A session (a writer opened on an existing trace, e.g. a run resumed from a checkpoint) whose
        first step of a split is N supersedes what earlier sessions of the same writer rank wrote in
        that split at steps >= N: those belong to an abandoned run, even where the new run has not
        rewritten them (yet). N is the session's recorded "first_step" (the tracer notes it before its
        first part, so it holds even where that part never reached the disk), else its first part's
        first step. Sessions without "first_seq" (older traces) are not considered.
        """
        noted: dict[tuple[int, int], int] = {}
        for x in self.manifest.sessions:
            if isinstance(x, dict) and isinstance(x.get("first_seq"), int):
                key = (int(x["first_seq"]), int(x.get("writer_rank", 0)))
                fs = x.get("first_step")
                if isinstance(fs, int) and not isinstance(fs, bool) and fs >= 0:
                    noted[key] = min(fs, noted.get(key, fs))
                else:
                    noted.setdefault(key, -1)
        starts = sorted(noted)
        out = []
        for j, (first_seq, rank) in enumerate(starts):
            nxt = min((f for f, r in starts[j + 1:] if r == rank), default=None)
            for split in {p.split for p in self._parts}:
                same = [p for p in self._parts if p.writer_rank == rank and p.split == split]
                mine = [p.first for p in same if p.seq >= first_seq and (nxt is None or p.seq < nxt)]
                if noted[(first_seq, rank)] >= 0:
                    mine.append(noted[(first_seq, rank)])
                if mine and any(p.seq < first_seq for p in same):
                    out.append((first_seq, rank, split, min(mine)))
        return out

    def superseded(self, split: str = "train") -> list[tuple[int, int]]:
        """Step ranges (first, last inclusive) hidden because a later session restarted before them.

        A run resumed from a checkpoint at step N makes the steps >= N that the crashed run had
        written stale at once (they belong to the abandoned run); the resumed run's own steps
        replace them as it goes. Such steps are not returned by any read and are not gaps.
        """
        self._index  # noqa: B018 (computes the stale ranges)
        return list(self._stale.get(split, []))

    def _touch(self, split: str, want: np.ndarray | None = None, lo: float = -np.inf, hi: float = np.inf) -> None:
        """Raise TraceFormatError for a bad part whose step range meets the selection (default mode)."""
        if self.skip_bad_parts:
            return
        for i, why in self._index[1].items():
            b = self._parts[i]
            if b.split != split or b.last < lo or b.first > hi:
                continue
            if want is None or np.any((want >= b.first) & (want <= b.last)):
                raise TraceFormatError(f"{b.path}: {why} (steps {b.first}..{b.last}{SKIP_HINT})")

    def steps_of(self, split: str = "train") -> np.ndarray:
        """[S] recorded step numbers of one split, sorted."""
        self._touch(split)
        if split not in self._owner:
            return np.zeros(0, dtype=np.int64)
        return self._owner[split][0].copy()

    @property
    def steps(self) -> np.ndarray:
        """[S] recorded training step numbers, sorted."""
        return self.steps_of("train")

    def gaps(self, split: str = "train") -> list[tuple[int, int]]:
        """Missing step ranges (first, last inclusive) between the first and last recorded step.

        With skip_bad_parts, the span also covers the step ranges named by skipped parts.
        """
        s = self.steps_of(split)
        ends = [(b.first, b.last) for b in (self._parts[i] for i in self._index[1]) if b.split == split]
        if ends:  # the span reaches the skipped parts' ranges, so they show as gaps
            lo = min(min(a for a, _ in ends), s[0] if len(s) else np.inf)
            hi = max(max(b for _, b in ends), s[-1] if len(s) else -np.inf)
            s = np.r_[int(lo) - 1, s, int(hi) + 1]
        jump = np.flatnonzero(np.diff(s) > 1)
        return [(int(s[i]) + 1, int(s[i + 1]) - 1) for i in jump]

    # ---- selections -------------------------------------------------------------------------
    def _select_steps(self, steps: StepSel, split: str) -> tuple[np.ndarray, np.ndarray]:
        all_steps, owner = self._owner.get(split, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        if steps is None:
            self._touch(split)
            keep = np.ones(len(all_steps), bool)
        elif isinstance(steps, (tuple, slice)):
            if isinstance(steps, tuple) and len(steps) != 2:
                raise InputError(f"{self.path}: steps=(start, stop) needs 2 step numbers, got {len(steps)}")
            start, stop, stride = (steps.start, steps.stop, steps.step) if isinstance(steps, slice) else (*steps, None)
            start, stop, stride = (None if v is None else self._index_arg("steps", v) for v in (start, stop, stride))
            if stride is not None and stride < 1:
                raise InputError(f"{self.path}: steps slice stride must be a positive integer, got {stride}")
            self._touch(split, lo=-np.inf if start is None else start, hi=np.inf if stop is None else stop - 1)
            keep = np.ones(len(all_steps), bool)
            if start is not None:
                keep &= all_steps >= start
            if stop is not None:
                keep &= all_steps < stop
            if stride is not None and stride > 1:  # step numbers start, start + stride, ... (start 0 if None)
                keep &= (all_steps - (start or 0)) % stride == 0
        else:
            want = self._step_array(steps)
            self._touch(split, want)
            missing = np.setdiff1d(want, all_steps)
            if len(missing):
                raise TraceFormatError(
                    f"{self.path}: step(s) {missing[:5].tolist()} not recorded (have {len(all_steps)} steps"
                    + (f", {all_steps[0]}..{all_steps[-1]})" if len(all_steps) else ")")
                )
            idx = np.searchsorted(all_steps, want)
            return all_steps[idx], owner[idx]
        return all_steps[keep], owner[keep]

    def _index_arg(self, what: str, v: Any) -> int:
        """A step or layer number given by the caller: a Python or NumPy integer; bool, float (2.7 is not
        truncated to 2) and anything else raise InputError."""
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise InputError(f"{self.path}: {what} must be integers, got {v!r} ({type(v).__name__})")
        return int(v)

    def _step_array(self, steps: Any) -> np.ndarray:
        """Explicit step numbers (a range, sequence or array of integers) -> [n] int64."""
        if isinstance(steps, range):
            return np.arange(steps.start, steps.stop, steps.step, dtype=np.int64)
        try:
            a = np.asarray(steps)
        except (ValueError, TypeError):
            raise InputError(f"{self.path}: steps must be step numbers (integers)") from None
        if a.size == 0:
            return np.zeros(0, np.int64)
        flat = a.reshape(-1)
        if a.dtype.kind == "O":  # mixed types, or Python integers too large for int64
            bad = next((x for x in flat if isinstance(x, bool) or not isinstance(x, (int, np.integer))), None)
            if bad is None:
                raise InputError(f"{self.path}: steps beyond int64 (got {max(flat)})")
            raise InputError(f"{self.path}: steps must be integers, got {bad!r} ({type(bad).__name__})")
        if a.dtype.kind not in "iu":
            raise InputError(f"{self.path}: steps must be integers, got {flat[0]!r} ({a.dtype})")
        if a.dtype.kind == "u" and a.max() > np.iinfo(np.int64).max:
            raise InputError(f"{self.path}: steps beyond int64 (got {a.max()})")
        return flat.astype(np.int64)

    def layer_ids(self, layers: LayerSel = None) -> np.ndarray:
        """[L'] layer ids (positions in `layers`) of a layer selection: ids, module paths, or None (all);
        InputError with one line for a name or id the trace does not hold."""
        return self._select_layers(layers)

    def select_steps(self, steps: StepSel = None, split: str = "train") -> np.ndarray:
        """[S'] the recorded step numbers a step selection picks (the rows every read with that `steps`
        returns), without reading counts; InputError / TraceFormatError as the reads raise them."""
        return self._select_steps(steps, split)[0].copy()

    def _select_layers(self, layers: LayerSel) -> np.ndarray:
        if layers is None:
            return np.arange(self.num_layers)
        if isinstance(layers, (int, np.integer, str, float, np.floating)):
            layers = [layers]
        out = []
        for x in layers:
            if isinstance(x, str):
                if x not in self.manifest.layers:
                    raise TraceFormatError(f"{self.path}: no layer named {x!r}; layers are {self.layers}")
                out.append(self.manifest.layers.index(x))
            else:
                i = self._index_arg("layers", x)
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
                    raise TraceFormatError(f"{part.path}: {column} counts summed over ranks exceed int64 "
                                           f"(steps {part.first}..{part.last}{SKIP_HINT})")
                vals = summed
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

    def micro_batch_counts(self, steps: StepSel = None, layers: LayerSel = None, *, per_rank: bool = False) -> np.ndarray:
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
        why = (f"micro-batch rows stopped at step {stop.get('step')}: {stop.get('reason')}" if isinstance(stop, dict)
               else f"lost: {lost}" if lost else None)
        pieces = []
        for pi in np.unique(owner):
            part = self._parts[pi]
            mine = sel_steps[owner == pi]
            mp = self.path / MICRO_DIR / part.path.name
            if not mp.exists():
                raise TraceFormatError(f"{mp}: missing: steps {part.first}..{part.last} have no micro-batch rows"
                                       + (f" ({clip(why, 160)})" if why else ""))
            t = read_columns(mp, ["step", "micro_batch", "layer", "rank", "tokens", "routed"],
                             [("step", ">=", int(mine.min())), ("step", "<=", int(mine.max()))])
            st, mb, lyr, rk = (t.column(c).to_numpy() for c in ("step", "micro_batch", "layer", "rank"))
            if len(st) and (lyr.min() < 0 or lyr.max() >= self.num_layers or mb.min() < 0 or mb.max() >= 4096
                            or rk.max() >= m.world_size):
                raise TraceFormatError(f"{mp}: layer, micro_batch or rank ids out of range{SKIP_HINT}")
            absent = np.setdiff1d(mine, st)
            if len(absent):
                raise TraceFormatError(f"{mp}: no micro-batch rows for step(s) {absent[:5].tolist()}"
                                       + (f" ({clip(why, 160)})" if why else ""))
            rows = np.isin(st, mine) & (lay_pos[lyr] >= 0)
            vals = _dense_lists(t.column("routed").filter(pa.array(rows)), E)
            tok = t.column("tokens")
            used = (vals.sum(-1) > 0) if tok.null_count else tok.to_numpy()[rows] > 0  # imports: tokens unknown
            pieces.append((np.searchsorted(sel_steps, st[rows]), mb[rows], lay_pos[lyr[rows]],
                           np.maximum(rk[rows], 0) if per_rank else np.zeros(int(rows.sum()), np.int64), vals, used))
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
            t = read_columns(part.path, ["step", "layer", "bias"],
                             [("step", ">=", int(mine.min())), ("step", "<=", int(mine.max()))])
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

    def gpu_loads(self, steps: StepSel = None, layers: LayerSel = None, *, kind: str = "routed", split: str = "train") -> np.ndarray:
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
                        raise TraceFormatError(f"{self.path}: the load of rank {g} in layer {self.layers[li]!r} exceeds int64")
                    out[rows, j, g] = load
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


def _ranges(steps: np.ndarray) -> list[tuple[int, int]]:
    """steps [S] sorted -> [(first, last)] runs of consecutive step numbers."""
    if len(steps) == 0:
        return []
    cut = np.flatnonzero(np.diff(steps) > 1)
    firsts = np.r_[steps[0], steps[cut + 1]]
    lasts = np.r_[steps[cut], steps[-1]]
    return [(int(a), int(b)) for a, b in zip(firsts, lasts)]
