"""TraceWriter: appends blocks of steps to a trace directory as Parquet parts, atomically."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moeload.errors import TraceFormatError
from moeload.trace.manifest import (
    MANIFEST_NAME,
    PARTS_DIR,
    Manifest,
    _now,
    read_manifest,
    write_json_atomic,
)

PART_RE = re.compile(r"^part-(\d{6,})-r(\d+)-(train|eval)-s(\d+)-(\d+)\.parquet$")
SPLITS = ("train", "eval")


MICRO_DIR = "micro"
"""Subdirectory of the micro-batch parts (LoadTracer(per_micro_batch=True)), named like the train parts they refine."""


def part_name(seq: int, writer_rank: int, split: str, first: int, last: int) -> str:
    return f"part-{seq:06d}-r{writer_rank}-{split}-s{first:09d}-{last:09d}.parquet"


def _list_array(x: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    """x: [N, Emax] counts; lengths: [N] experts in each row's layer -> list<int32|int64> (float64 for
    a floating x)."""
    if x.dtype.kind == "f":
        values_dtype: type = np.float64
    elif x.size and (x.max() >= 2**31 or x.min() < 0):
        values_dtype = np.int64
    else:
        values_dtype = np.int32
    if np.all(lengths == x.shape[1]):
        flat = x.reshape(-1)
    else:
        mask = np.arange(x.shape[1])[None, :] < lengths[:, None]
        flat = x[mask]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(values_dtype, copy=False)))


class TraceWriter:
    """Writes one trace directory. Appends to an existing trace of the same model (resume).

    Each `write_block` becomes one Parquet part, written to a hidden temporary name and renamed,
    so readers never see half a part. A step written again later replaces the earlier one
    (the part with the higher sequence number wins).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        manifest: Manifest,
        *,
        writer_rank: int = 0,
        fsync: bool = True,
        write_manifest: bool = True,
    ) -> None:
        self.path = Path(path)
        self.writer_rank = int(writer_rank)
        self.fsync = fsync
        self.parts_dir = self.path / PARTS_DIR
        mpath = self.path / MANIFEST_NAME
        if self.path.exists() and not self.path.is_dir():
            raise TraceFormatError(f"{self.path}: exists and is not a directory")
        self._seq = self._next_seq()
        # first_seq: parts numbered from here on are this session's; the reader uses it to hide
        # steps an abandoned earlier run wrote past the step this one restarted from
        session = {"start_time": _now(), "pid": os.getpid(), "writer_rank": self.writer_rank, "first_seq": self._seq}
        if mpath.exists():
            old = read_manifest(self.path)
            old.check_compatible(manifest, where=str(self.path))
            old.sessions.append(session)
            self.manifest = old
        else:
            manifest.sessions = [*manifest.sessions, session]
            self.manifest = manifest
        self.manifest.validate(str(mpath))
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        if write_manifest:
            write_json_atomic(mpath, self.manifest.to_dict())
        self._lengths = np.asarray(self.manifest.experts_per_layer, dtype=np.int64)
        self.parts_written: list[Path] = []

    @property
    def last_seq(self) -> int:
        """Sequence number of the part written last by this writer (-1 before any)."""
        return self._seq - 1 if self.parts_written else -1

    def temp_part_path(self, split: str, first: int, last: int) -> Path:
        """The hidden temporary file the next part of these steps is written to (removed if it fails)."""
        return self.parts_dir / f".{part_name(self._seq, self.writer_rank, split, first, last)}.tmp"

    def _next_seq(self) -> int:
        if not self.parts_dir.is_dir():
            return 0
        seqs = [int(m.group(1)) for p in self.parts_dir.iterdir() if (m := PART_RE.match(p.name))]
        return max(seqs, default=-1) + 1

    def _remove_stale_temporaries(self) -> None:
        """Delete this writer rank's half-written parts left by a killed earlier session (readers
        ignore them anyway; a new part could otherwise reuse such a name)."""
        for p in self.parts_dir.glob(".part-*.tmp"):
            m = PART_RE.match(p.name[1:].removesuffix(".tmp"))
            if m and int(m.group(2)) == self.writer_rank:
                try:
                    p.unlink()
                except OSError:
                    pass

    def write_block(
        self,
        steps: np.ndarray,
        routed: np.ndarray,
        kept: np.ndarray | None = None,
        tokens: np.ndarray | None = None,
        *,
        split: str = "train",
        times: np.ndarray | None = None,
        bias: np.ndarray | None = None,
    ) -> Path | None:
        """Write one part.

        steps: [S] step numbers; routed, kept: [S, R, L, E] or [S, L, E] counts (E may be the max
        over layers, padding beyond a layer's experts is ignored); tokens: [S, R, L] or [S, L]
        tokens seen by each router; times: [S] unix seconds at step end; bias: [S, L, E] float64
        router expert bias in force during each step (NaN: none), written to every rank row of its
        (step, layer) as the list<float64> column "bias". R = world_size when the
        manifest records ranks, else 1 (pre-summed global counts). Returns the part path.
        """
        m = self.manifest
        steps = np.asarray(steps, dtype=np.int64).reshape(-1)
        S = len(steps)
        if S == 0:
            return None
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if len(np.unique(steps)) != S:
            raise ValueError("write_block: steps must be unique within a block")

        def as4(name: str, a: np.ndarray | None, extra_dims: int) -> np.ndarray | None:
            if a is None:
                return None
            a = np.asarray(a)
            if a.ndim == 2 + extra_dims:
                a = a[:, None]
            if a.ndim != 3 + extra_dims or a.shape[0] != S or a.shape[2] != m.num_layers:
                raise ValueError(f"write_block: {name} has shape {a.shape}, expected [S={S}, R, L={m.num_layers}, ...]")
            return a

        routed = cast(np.ndarray, as4("routed", routed, 1))  # not None: routed is required
        kept = as4("kept", kept, 1)
        tokens = as4("tokens", tokens, 0)
        R = routed.shape[1]
        if routed.shape[3] < m.num_experts:
            raise ValueError(f"write_block: routed has {routed.shape[3]} experts, manifest needs {m.num_experts}")
        if m.ranks_recorded and R != m.world_size:
            raise ValueError(f"write_block: {R} ranks given, manifest world_size is {m.world_size}")
        if not m.ranks_recorded and R != 1:
            raise ValueError("write_block: manifest has ranks_recorded=False, so routed must hold one (global) row")
        if m.count_kind in ("kept", "both") and kept is None:
            raise ValueError(f"write_block: manifest count_kind={m.count_kind!r} needs kept counts")
        L = m.num_layers
        n = S * R * L
        # rows are layer-major (layer, step, rank), one row group per layer, so that a read of a few
        # layers skips the other row groups by their statistics
        order = (2, 0, 1)
        routed = routed.transpose(*order, 3)
        kept = kept.transpose(*order, 3) if kept is not None else None
        tokens = tokens.transpose(*order) if tokens is not None else None
        rank_ids = np.arange(R, dtype=np.int32) if m.ranks_recorded else np.full(1, -1, dtype=np.int32)
        l_col = np.repeat(np.arange(L, dtype=np.int32), S * R)
        s_col = np.tile(np.repeat(steps, R), L)
        r_col = np.tile(rank_ids, S * L)
        lengths = np.repeat(self._lengths, S * R)
        E = m.num_experts
        cols: dict[str, pa.Array] = {
            "step": pa.array(s_col),
            "layer": pa.array(l_col),
            "rank": pa.array(r_col),
            "split": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int8)), pa.array([split])),
            "tokens": pa.array(tokens.reshape(n).astype(np.int64)) if tokens is not None else pa.nulls(n, pa.int64()),
            "routed": _list_array(routed[..., :E].reshape(n, E), lengths),
        }
        if kept is not None and m.count_kind in ("kept", "both"):
            cols["kept"] = _list_array(kept[..., :E].reshape(n, E), lengths)
        if times is not None:
            cols["time"] = pa.array(np.tile(np.repeat(np.asarray(times, dtype=np.float64), R), L))
        if bias is not None:
            b = np.asarray(bias, dtype=np.float64)
            if b.shape[:2] != (S, L) or b.shape[2] < E:
                raise ValueError(f"write_block: bias has shape {b.shape}, expected [S={S}, L={L}, E>={E}]")
            rows = np.repeat(b.transpose(1, 0, 2)[..., :E].reshape(L * S, E), R, axis=0)  # (layer, step, rank) rows
            cols["bias"] = _list_array(rows, lengths)
        name = part_name(self._seq, self.writer_rank, split, int(steps.min()), int(steps.max()))
        final = self._publish(pa.table(cols), self.parts_dir, name, row_group_size=S * R)
        self._seq += 1
        self.parts_written.append(final)
        return final

    def write_micro_block(
        self, seq: int, steps: np.ndarray, routed: np.ndarray, tokens: np.ndarray | None
    ) -> Path | None:
        """Write the micro-batch rows of the train part numbered `seq` (written just before) into
        `micro/`, under that part's name: the reader takes a step's micro-batches from the part that
        owns the step. steps: [S]; routed: [S, R, M, L, E] counts; tokens: [S, R, M, L] (None: unknown,
        a null column); R as in `write_block`. Rows: (layer, step, micro_batch, rank), micro-batches 0..M-1."""
        m = self.manifest
        steps = np.asarray(steps, dtype=np.int64).reshape(-1)
        S = len(steps)
        if S == 0:
            return None
        routed = np.asarray(routed)
        tokens = None if tokens is None else np.asarray(tokens)
        if (
            routed.ndim != 5
            or routed.shape[0] != S
            or routed.shape[3] != m.num_layers
            or (tokens is not None and tokens.shape != routed.shape[:4])
        ):
            raise ValueError(
                f"write_micro_block: routed {routed.shape} / tokens {getattr(tokens, 'shape', None)}, expected "
                f"[S={S}, R, M, L={m.num_layers}, E] / [S, R, M, L]"
            )
        _, R, M, L, _ = routed.shape
        E = m.num_experts
        n = S * R * M * L
        r = routed.transpose(3, 0, 2, 1, 4)[..., :E].reshape(n, E)  # (layer, step, micro_batch, rank) rows
        rank_ids = np.arange(R, dtype=np.int32) if m.ranks_recorded else np.full(1, -1, dtype=np.int32)
        table = pa.table(
            {
                "step": pa.array(np.tile(np.repeat(steps, M * R), L)),
                "micro_batch": pa.array(np.tile(np.repeat(np.arange(M, dtype=np.int32), R), S * L)),
                "layer": pa.array(np.repeat(np.arange(L, dtype=np.int32), S * M * R)),
                "rank": pa.array(np.tile(rank_ids, S * M * L)),
                "tokens": (
                    pa.nulls(n, pa.int64())
                    if tokens is None
                    else pa.array(tokens.transpose(3, 0, 2, 1).reshape(n).astype(np.int64))
                ),
                "routed": _list_array(r, np.repeat(self._lengths, S * M * R)),
            }
        )
        d = self.path / MICRO_DIR
        d.mkdir(exist_ok=True)
        name = part_name(seq, self.writer_rank, "train", int(steps.min()), int(steps.max()))
        return self._publish(table, d, name, row_group_size=S * M * R)

    def _publish(self, table: pa.Table, directory: Path, name: str, *, row_group_size: int) -> Path:
        """Write `table` to the hidden `.NAME.tmp` in `directory`, fsync it (where `fsync`), rename it to
        NAME -> that path. Parts appear whole or not at all; a failed write removes its temporary file
        (where the file system lets it) and raises."""
        final, tmp = directory / name, directory / f".{name}.tmp"
        try:
            with open(tmp, "wb") as f:
                # page CRCs let the reader tell a byte-flipped part from a valid one
                pq.write_table(table, f, compression="zstd", row_group_size=row_group_size, write_page_checksum=True)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        return final

    def close(self) -> None:
        """Nothing is buffered here; kept for symmetry with the context-manager protocol."""

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
