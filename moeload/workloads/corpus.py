"""Offline text corpus: the running Python's own standard-library sources, as byte tokens.

Nothing is downloaded. The file list is every ``*.py`` under ``sysconfig.get_paths()["stdlib"]``
except installed packages (``site-packages``, ``dist-packages``) and caches, sorted by relative
POSIX path, so the same interpreter always yields the same bytes. Tokens are raw bytes (vocab 256);
files are joined with a NUL byte, which never occurs in source text, as a document separator.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from moeload.errors import InputError

VOCAB_SIZE = 256
SEPARATOR = 0
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Sorted ``*.py`` files of the standard library (installed packages excluded)."""
    root = stdlib_root() if root is None else Path(root)
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _cache_key(root: Path, files: list[Path]) -> str:
    h = hashlib.sha256(sys.version.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _cache_dir() -> Path:
    base = os.environ.get("MOELOAD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moeload"
    )
    return Path(base)


@functools.lru_cache(maxsize=2)
def load_corpus(root: str | None = None) -> np.ndarray:
    """All corpus bytes, cached in memory and on disk (``$MOELOAD_CACHE`` or ``~/.cache/moeload``).

    Returns ``tokens: [N] uint8`` (read-only). The disk cache is keyed by interpreter version and
    every file's path, size and mtime; an unwritable cache directory is silently skipped.
    """
    root_path = stdlib_root() if root is None else Path(root)
    if not root_path.is_dir():
        raise InputError(f"corpus root {root_path}: not a directory")
    files = stdlib_files(root_path)
    if not files:
        raise InputError(f"corpus root {root_path}: no .py files found")
    cache = _cache_dir() / f"stdlib-{_cache_key(root_path, files)}.npy"
    if cache.is_file():
        try:
            tokens = np.load(cache, mmap_mode="r")
            if tokens.dtype == np.uint8 and tokens.ndim == 1:
                return tokens
        except (OSError, ValueError):
            pass
    sep = bytes([SEPARATOR])
    tokens = np.frombuffer(sep.join(f.read_bytes().replace(sep, b"") for f in files), np.uint8)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, tokens)
        os.replace(tmp, cache)
    except OSError:
        pass
    return tokens


def split(tokens: np.ndarray, val_fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous train/validation split: ``tokens: [N]`` -> (``train: [N - V]``, ``val: [V]``).

    Validation is the last ``val_fraction`` of the corpus (whole files at the end of the sorted list).
    """
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"val_fraction={val_fraction}: must be in (0, 1)")
    cut = int(len(tokens) * (1.0 - val_fraction))
    return tokens[:cut], tokens[cut:]


def sample_batch(
    data: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random windows of ``data: [N] uint8`` -> (``x: [B, S] int64``, ``y: [B, S] int64``), y = x shifted by one."""
    if len(data) <= seq_len + 1:
        raise InputError(f"seq_len={seq_len}: corpus split has only {len(data)} tokens")
    starts = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
    windows = data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
    return windows[:, :-1], windows[:, 1:]


def batch_iterator(
    data: np.ndarray, batch_size: int, seq_len: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless deterministic stream of ``sample_batch`` results: same seed, same batches."""
    rng = np.random.default_rng(seed)
    while True:
        yield sample_batch(data, batch_size, seq_len, rng)
