"""Checks of Parquet parts against their name and the manifest; every problem is one line of text.

Quick checks (`index_part`) read the footer and the step and split columns only: columns and
types, steps inside the range in the part's name, the `split` column holding only the split in
the part's name (a part named `train` holding `eval` rows is refused at open, as a bad part: read
as train it would mix evaluation forwards into training counts), rows = steps x layers x ranks.
The writer rank in a name is not checked against the rows: rank 0 writes every rank's rows. Row checks (`rows_problem`)
look at the rows themselves: layer and rank ids, duplicate rows, count lists of exactly
experts_per_layer[layer] non-negative entries. `check_part` runs both on a whole part.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moeload.errors import TraceFormatError, first_line
from moeload.trace.manifest import Manifest

# what pyarrow and numpy raise on bytes that are not a valid Parquet file (a corrupt footer or page
# can surface as any of these)
READ_ERRORS = (pa.ArrowException, OSError, ValueError, KeyError, IndexError, TypeError, EOFError, MemoryError)
LIST_COLUMNS = ("routed", "kept")
I64_MAX = int(np.iinfo(np.int64).max)


def checked_sum(a: np.ndarray, add: Callable[[np.ndarray], np.ndarray], n: int) -> np.ndarray | None:
    """Exact sums of non-negative int64 values: add(x) sums at most n entries of x into each output
    (e.g. lambda x: x.sum(-1)). -> the sums as int64, or None if one would overflow int64.

    Above the fast bound the high and low 32 bits are summed apart (each sum fits int64 for
    n < 2**31), so overflow is detected exactly instead of wrapping to negative counts.
    """
    if a.size == 0 or int(a.max()) <= I64_MAX // max(n, 1):
        return add(a)
    hi, lo = add(a >> 32), add(a & 0xFFFFFFFF)
    top = hi + (lo >> 32)
    if (top >= 2**31).any():
        return None
    return (top << 32) | (lo & 0xFFFFFFFF)


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn what pyarrow raises on a damaged file into one TraceFormatError naming `path` (a
    TraceFormatError raised inside passes unchanged: it is itself a ValueError)."""
    try:
        yield
    except TraceFormatError:
        raise
    except READ_ERRORS as e:
        raise TraceFormatError(f"{path}: unreadable Parquet part ({first_line(e)})") from None


def read_columns(path: Path, columns: list[str], filters: Any = None) -> pa.Table:
    """Columns of one part; an unreadable file raises TraceFormatError naming it."""
    with reading(path):
        return pq.read_table(path, columns=columns, filters=filters, page_checksum_verification=True)


def required_columns(m: Manifest) -> list[str]:
    return ["step", "layer", "rank", "routed"] + (["kept"] if m.count_kind != "routed" else [])


def rows_per_step(m: Manifest) -> int:
    """Rows each step has in a part: one per layer and recorded rank."""
    return m.num_layers * (m.world_size if m.ranks_recorded else 1)


def index_part(path: Path, m: Manifest, first: int, last: int, split: str | None = None) -> np.ndarray:
    """Quick checks of one part -> [n] its distinct step numbers, sorted. `first`, `last` and
    `split` are what its file name says; a `split` column saying otherwise makes it a bad part."""
    with reading(path), pq.ParquetFile(path, page_checksum_verification=True) as pf:
        schema = pf.schema_arrow
        num_rows = pf.metadata.num_rows
        missing = [c for c in required_columns(m) if c not in schema.names]
        if missing:
            raise TraceFormatError(f"{path}: missing column(s) {missing}")
        problem = _type_problem(schema)
        if problem:
            raise TraceFormatError(f"{path}: {problem}")
        check_split = split is not None and "split" in schema.names
        t = pf.read(columns=["step", "split"] if check_split else ["step"])
        col = t.column("step")
        if check_split and split is not None:
            problem = _split_problem(t.column("split"), split)
            if problem:
                raise TraceFormatError(f"{path}: {problem}")
    if col.null_count:
        raise TraceFormatError(f"{path}: column 'step' has null values")
    s = np.unique(col.to_numpy())
    if len(s) and (s[0] < first or s[-1] > last):
        raise TraceFormatError(f"{path}: steps {s[0]}..{s[-1]} outside the range in its name ({first}..{last})")
    want = len(s) * rows_per_step(m)
    if num_rows != want or len(col) != num_rows:
        raise TraceFormatError(
            f"{path}: {num_rows} rows, expected {len(s)} steps x {rows_per_step(m)} (layers x ranks) = {want}; "
            "the part does not match the manifest"
        )
    return s.astype(np.int64)


def _type_problem(schema: pa.Schema) -> str | None:
    for name in ("step", "layer", "rank", "tokens"):
        if name in schema.names and not pa.types.is_integer(schema.field(name).type):
            return f"column {name!r} is {schema.field(name).type}, expected integers"
    for name in LIST_COLUMNS:
        if name in schema.names:
            t = schema.field(name).type
            if not (pa.types.is_list(t) and pa.types.is_integer(t.value_type)):
                return f"column {name!r} is {t}, expected list<int>"
    if "bias" in schema.names:
        t = schema.field("bias").type
        if not (pa.types.is_list(t) and pa.types.is_floating(t.value_type)):
            return f"column 'bias' is {t}, expected list<double>"
    return None


def _split_problem(col: pa.ChunkedArray, split: str) -> str | None:
    """A problem if the `split` column holds anything but the split in the part's file name."""
    t = col.type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        return f"column 'split' is {col.type}, expected strings"
    if col.null_count:
        return "column 'split' has null values"
    found = sorted(set(pc.unique(col.cast(t)).to_pylist()))
    if found != [split] and len(col):
        return f"column 'split' holds {found}, its file name says {split!r}"
    return None


def list_lengths(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, int]:
    """list<int> column -> (lengths [N], flat values [sum(lengths)], number of null lists)."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    nulls = sum(c.null_count for c in chunks)
    if not chunks:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    lengths = np.concatenate([np.diff(c.offsets.to_numpy()) for c in chunks]).astype(np.int64)
    vals = np.concatenate([c.flatten().to_numpy(zero_copy_only=False) for c in chunks])
    return lengths, vals, nulls


def rows_problem(m: Manifest, table: pa.Table) -> str | None:
    """First problem of the rows of a part (columns step, layer, rank, any count columns), or None."""
    for name in ("step", "layer", "rank"):
        if table.column(name).null_count:
            return f"column {name!r} has null values"
    layer = table.column("layer").to_numpy()
    rank = table.column("rank").to_numpy()
    L = m.num_layers
    if len(layer) and (layer.min() < 0 or layer.max() >= L):
        return (
            f"layer id {layer.min() if layer.min() < 0 else layer.max()} outside 0..{L - 1} (manifest has {L} layers)"
        )
    if m.ranks_recorded:
        if len(rank) and (rank.min() < 0 or rank.max() >= m.world_size):
            return f"rank {rank.min() if rank.min() < 0 else rank.max()} outside 0..{m.world_size - 1} (world_size)"
    elif len(rank) and (rank != -1).any():
        return "rank ids other than -1 in a trace of global counts (ranks_recorded is false)"
    step = table.column("step").to_numpy().astype(np.int64)
    key = np.stack([step, layer.astype(np.int64), rank.astype(np.int64)], 1)
    if len(key) and len(np.unique(key, axis=0)) != len(key):
        return "duplicate rows for one (step, layer, rank)"
    epl = np.asarray(m.experts_per_layer, dtype=np.int64)
    for name in LIST_COLUMNS:
        if name not in table.column_names:
            continue
        lengths, vals, nulls = list_lengths(table.column(name))
        if nulls:
            return f"column {name!r} has null count lists"
        bad = np.flatnonzero(lengths != epl[layer])
        if len(bad):
            i = bad[0]
            return (
                f"{name} counts of layer {layer[i]} ({m.layers[layer[i]]!r}) have {lengths[i]} experts, "
                f"manifest says {epl[layer[i]]}"
            )
        if len(vals) and vals.min() < 0:
            return f"column {name!r} holds a negative count ({vals.min()})"
        if len(vals) and vals.dtype.kind == "u" and int(vals.max()) > I64_MAX:
            return f"column {name!r} holds a count beyond int64 ({vals.max()})"
        if m.ranks_recorded and m.world_size > 1 and len(vals) and int(vals.max()) > I64_MAX // m.world_size:
            problem = _rank_sum_problem(name, step, layer, vals, lengths)
            if problem:
                return problem
    if "tokens" in table.column_names:
        tok = table.column("tokens")
        if tok.null_count not in (0, len(tok)):
            return "column 'tokens' is null in some rows only"
        if tok.null_count == 0 and len(tok):
            t = tok.to_numpy()
            if t.min() < 0:
                return f"column 'tokens' holds a negative value ({t.min()})"
            if t.dtype.kind == "u" and int(t.max()) > I64_MAX:
                return f"column 'tokens' holds a value beyond int64 ({t.max()})"
    return None


def _rank_sum_problem(
    name: str, step: np.ndarray, layer: np.ndarray, vals: np.ndarray, lengths: np.ndarray
) -> str | None:
    """A problem if the per-rank counts of one (step, layer, expert) sum beyond int64 (rows hold
    non-negative counts that fit int64, checked before)."""
    vals = vals.astype(np.int64)
    row = np.repeat(np.arange(len(lengths)), lengths)
    expert = np.arange(len(vals)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    key = np.stack([step[row], layer[row].astype(np.int64), expert], 1)
    _, group = np.unique(key, axis=0, return_inverse=True)
    group = group.reshape(-1)
    order = np.argsort(group, kind="stable")
    starts = np.flatnonzero(np.r_[True, group[order][1:] != group[order][:-1]])
    n = int(np.diff(np.r_[starts, len(order)]).max())
    if checked_sum(vals[order], lambda x: np.add.reduceat(x, starts), n) is None:
        return f"column {name!r}: counts summed over ranks exceed int64 (largest per-rank count {vals.max()})"
    return None


def check_part(path: Path, m: Manifest, first: int, last: int, split: str | None = None) -> np.ndarray:
    """Quick and row checks of a whole part -> [n] its steps; a problem raises TraceFormatError."""
    steps = index_part(path, m, first, last, split)
    with reading(path), pq.ParquetFile(path, page_checksum_verification=True) as pf:
        names = [c for c in ("step", "layer", "rank", "tokens", *LIST_COLUMNS) if c in pf.schema_arrow.names]
        table = pf.read(columns=names)
    problem = rows_problem(m, table)
    if problem:
        raise TraceFormatError(f"{path}: {problem}")
    return steps
