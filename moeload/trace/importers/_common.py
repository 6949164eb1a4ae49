"""What every importer returns, and writing it as a moeload trace."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moeload.errors import InputError, TraceFormatError, first_line
from moeload.trace.manifest import PARTS_DIR, Manifest
from moeload.trace.writer import TraceWriter

BLOCK = 1000  # steps per Parquet part
MAX_EXPERTS = 1 << 16  # an expert index at or above this is taken for corrupt input, not a model
MAX_RANKS = 1 << 17  # likewise for a rank number
MAX_DENSE_BYTES = 2 * 1024**3  # largest counts array an import builds (int64 [S, R, L, E])
INT64_MAX = 2**63 - 1
GZIP_MAGIC = b"\x1f\x8b"


@dataclasses.dataclass
class Imported:
    """Counts read from another tool's files.

    steps: [S] step numbers, increasing; counts: [S, R, L, E] int64 (R = 1 unless ranks_recorded,
    then R = world_size and each rank holds the assignments of its own tokens); layers: [L] names;
    experts_per_layer: [L]; top_k: [L] or int.
    """

    steps: np.ndarray
    counts: np.ndarray
    layers: list[str]
    experts_per_layer: list[int]
    top_k: list[int] | int
    framework: str
    ranks_recorded: bool = False
    world_size: int = 1
    ep_size: int = 1
    framework_version: str | None = None
    model_name: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    micro: np.ndarray | None = None
    """[S, R, M, L, E] counts of each micro-batch where the source keeps them (summed over M: `counts`)."""


def check_dest(dest: str | os.PathLike) -> Path:
    """The output directory must not exist yet or be empty (an import never appends)."""
    d = Path(dest)
    if d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise InputError(f"{d}: already exists; choose a new directory for the imported trace")
    return d


def write(
    imp: Imported,
    dest: str | os.PathLike,
    source: str | os.PathLike,
    *,
    check: Callable[[Imported], None] | None = None,
) -> Path:
    """Write `imp` as a new trace at `dest` (blocks of BLOCK steps). Returns the trace path.

    The trace is built in a hidden sibling of `dest` (same parent, so the final rename is atomic)
    and renamed to `dest` only when complete. After any failure (disk full, out of memory, an
    interrupt) the sibling and the parent folders this call created are removed and `dest` does
    not exist; a write error or MemoryError becomes an InputError naming `dest`. A process killed
    outright leaves only the hidden `.NAME.importing-*` sibling, never a partial `dest`.
    check: called with `imp` once it is known to make a valid trace, before anything is written;
    it raises to refuse the import.
    """
    d = check_dest(dest)
    S = len(imp.steps)
    if S == 0:
        raise InputError(f"{source}: no steps found to import")
    if imp.counts.shape[0] != S or imp.counts.ndim != 4:
        raise ValueError(f"importer bug: counts {imp.counts.shape} for {S} steps")
    m = _manifest(imp, source)
    if check is not None:
        check(imp)
    order = np.argsort(imp.steps, kind="stable")
    steps, counts = imp.steps[order], imp.counts[order]
    target = Path(os.path.realpath(d))  # a link to an empty directory: build beside where it points
    tmp = target.parent / f".{target.name[:200]}.importing-{os.getpid()}-{secrets.token_hex(4)}"
    created: list[Path] = []
    try:
        created = _make_parents(target.parent)
        tmp.mkdir()
        micro = None if imp.micro is None else imp.micro[order]
        with TraceWriter(tmp, m) as w:
            for i in range(0, S, BLOCK):
                w.write_block(steps[i : i + BLOCK], counts[i : i + BLOCK])
                if micro is not None:
                    w.write_micro_block(w.last_seq, steps[i : i + BLOCK], micro[i : i + BLOCK], None)
        _fsync_dir(tmp / PARTS_DIR)
        _fsync_dir(tmp)
        _publish(tmp, target, d)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # deepest first; stops at the first that is not empty
            try:
                p.rmdir()
            except OSError:
                break
        if isinstance(e, OSError):
            raise InputError(
                f"{d}: cannot write the imported trace ({e.strerror or first_line(e)}); nothing was written"
            ) from None
        if isinstance(e, MemoryError):
            raise InputError(
                f"{d}: out of memory while writing the imported trace; import a part of {source}; nothing was written"
            ) from None
        raise
    try:
        _fsync_dir(target.parent)  # the trace is complete and in place; this only makes its name durable
    except OSError:
        pass
    return d


def _make_parents(p: Path) -> list[Path]:
    """mkdir -p `p`; returns the folders it created, deepest first."""
    missing = []
    while not p.exists():
        missing.append(p)
        p = p.parent
    for q in reversed(missing):
        q.mkdir(exist_ok=True)
    return missing


def _publish(tmp: Path, target: Path, dest: Path) -> None:
    """Rename the finished trace `tmp` to `target` (an empty directory there is replaced); a
    `dest` that appeared meanwhile with content, or as a file, is refused."""
    try:
        os.rename(tmp, target)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise InputError(f"{dest}: already exists; choose a new directory for the imported trace") from None
        raise


def _fsync_dir(path: Path) -> None:
    """Make the names in directory `path` durable (a no-op where directories cannot be opened)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest(imp: Imported, source: str | os.PathLike) -> Manifest:
    """The manifest of an import; a problem (e.g. two layers of one name) names the source file."""
    try:
        return Manifest(
            layers=imp.layers,
            experts_per_layer=imp.experts_per_layer,
            top_k=imp.top_k,
            framework=imp.framework,
            framework_version=imp.framework_version,
            model_name=imp.model_name,
            world_size=imp.world_size,
            ep_size=imp.ep_size,
            ranks_recorded=imp.ranks_recorded,
            extra={"imported_from": str(source), **imp.extra},
        )
    except TraceFormatError as e:
        raise TraceFormatError(f"{source}: {str(e).removeprefix('manifest: ')}") from None


def counts_array(x: Any, where: str, *, what: str = "counts", error: type[Exception] = InputError) -> np.ndarray:
    """Integer-valued, non-negative array -> int64; anything else raises `error` naming `where`."""
    try:
        a = np.asarray(x)
    except (ValueError, TypeError, OverflowError):  # ragged nested lists
        raise error(f"{where}: {what} must be a rectangular array of integers") from None
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise error(f"{where}: {what} contain NaN or inf")
        if (a != np.round(a)).any():
            raise error(f"{where}: {what} must be whole numbers (got fractional values; proportions are not counts)")
    elif a.dtype.kind not in "iub":
        kind = "mixed or non-numeric values" if a.dtype.kind == "O" else f"dtype {a.dtype}"
        raise error(f"{where}: {what} must be integers, got {kind}")
    if a.size and a.dtype.kind in "fu" and a.max() >= 2**63:
        raise error(f"{where}: {what} too large for int64 (max {a.max():.3g})")
    a = a.astype(np.int64)
    if (a < 0).any():
        raise error(f"{where}: {what} must be non-negative (min {a.min()})")
    return a


def check_dense(source: str | os.PathLike, shape: tuple[int, ...], what: str = "counts") -> None:
    """InputError before allocating an int64 array of `shape` [S, R, L, E] larger than MAX_DENSE_BYTES."""
    nbytes = 8 * math.prod(int(n) for n in shape)
    if nbytes > MAX_DENSE_BYTES:
        dims = " x ".join(str(int(n)) for n in shape)
        raise InputError(
            f"{source}: {what} of {dims} (steps x ranks x layers x experts) would need "
            f"{nbytes / 1024**3:.3g} GiB, more than the {MAX_DENSE_BYTES // 1024**3} GiB an import "
            "may build; check the ids in the file or import a part of it"
        )


def jsonl_records(path: Path, required: tuple[str, ...]):
    """Yield (line number, record dict) of a JSON Lines file; bad lines raise TraceFormatError."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        if f.read(2) == GZIP_MAGIC:
            raise InputError(f"{path}: is gzip-compressed; decompress it first (gunzip -c)")
        f.seek(0)
        for no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TraceFormatError(f"{path}:{no}: not UTF-8 text (byte {e.start}); not a JSON Lines file") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceFormatError(f"{path}:{no}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise TraceFormatError(f"{path}:{no}: JSON nested too deeply") from None
            except ValueError as e:  # e.g. an integer beyond Python's int-string digits limit
                raise TraceFormatError(f"{path}:{no}: not usable JSON ({first_line(e)})") from None
            if not isinstance(rec, dict):
                raise TraceFormatError(f"{path}:{no}: expected a JSON object per line")
            missing = [k for k in required if k not in rec]
            if missing:
                raise TraceFormatError(f"{path}:{no}: missing field(s) {missing}")
            yield no, rec


def int_field(rec: dict, key: str, where: str) -> int:
    """A non-negative integer field that fits int64, else TraceFormatError naming `where`."""
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise TraceFormatError(f"{where}: field {key!r} must be a non-negative integer, got {str(v)[:40]!r}")
    if v > INT64_MAX:
        raise TraceFormatError(f"{where}: field {key!r} does not fit int64 (a {len(str(v))}-digit number)")
    return v


def dense(
    counts: dict[tuple[int, int, int], np.ndarray],
    steps: list[int],
    L: int,
    R: int,
    E: int,
    source: str | os.PathLike = "import",
) -> np.ndarray:
    """{(step, rank, layer): [E_l] counts} -> [S, R, L, E] int64 in the order of `steps`."""
    check_dense(source, (len(steps), R, L, E))
    pos = {s: i for i, s in enumerate(steps)}
    out = np.zeros((len(steps), R, L, E), dtype=np.int64)
    for (s, r, li), v in counts.items():
        out[pos[s], r, li, : len(v)] += v
    return out
