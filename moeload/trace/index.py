"""The parts of a trace directory and its step index: which part holds each recorded step (later
parts, and later sessions of a resumed run, supersede earlier ones), bad parts and gaps. `TraceIndex`
is the base of `Trace` (moeload.trace.reader), which reads the counts."""

from __future__ import annotations

import dataclasses
import os
import warnings
from functools import cached_property
from pathlib import Path
from typing import Any, cast

import numpy as np

from moeload.errors import TraceFormatError
from moeload.trace.checks import I64_MAX, check_part, index_part
from moeload.trace.manifest import PARTS_DIR, Manifest, read_manifest
from moeload.trace.writer import PART_RE

SKIP_HINT = "; open_trace(..., skip_bad_parts=True) or --skip-bad-parts reads the other parts"


@dataclasses.dataclass(frozen=True)
class _Part:
    path: Path
    seq: int
    writer_rank: int
    split: str
    first: int
    last: int


class TraceIndex:
    """A trace directory's manifest, its parts and which part holds each step (see `Trace`)."""

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
        skipped = [(p.name, why) for p, why in self._misnamed] + [
            (self._parts[i].path.name, why) for i, why in sorted(bad.items())
        ]
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
            nxt = min((f for f, r in starts[j + 1 :] if r == rank), default=None)
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


def _ranges(steps: np.ndarray) -> list[tuple[int, int]]:
    """steps [S] sorted -> [(first, last)] runs of consecutive step numbers."""
    if len(steps) == 0:
        return []
    cut = np.flatnonzero(np.diff(steps) > 1)
    firsts = np.r_[steps[0], steps[cut + 1]]
    lasts = np.r_[steps[cut], steps[-1]]
    return [(int(a), int(b)) for a, b in zip(firsts, lasts)]
