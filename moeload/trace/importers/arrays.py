"""NumPy arrays: `.npy` holding counts [S, L, E], or `.npz` with `counts` [S, L, E] and optional
`steps` [S], `layers` [L] names and `experts_per_layer` [L] (what `moeload export` writes)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from moeload.errors import InputError, MoeloadError, TraceFormatError, first_line
from moeload.trace.importers._common import INT64_MAX, MAX_DENSE_BYTES, Imported, counts_array


def npy_header(fp, where: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the header of an .npy stream at its start, without reading the data."""
    fmt = np.lib.format
    version = fmt.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = fmt.read_array_header_1_0(fp)
    elif version in ((2, 0), (3, 0)):
        shape, _, dtype = fmt.read_array_header_2_0(fp)
    else:
        raise TraceFormatError(f"{where}: unsupported .npy format version {version}")
    return shape, dtype


def _check_headers(path: Path) -> None:
    """Refuse .npy / .npz arrays whose headers claim more than MAX_DENSE_BYTES before np.load reads them."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                for name in (n for n in z.namelist() if n.endswith(".npy")):
                    with z.open(name) as fp:
                        _check_size(path, name, *npy_header(fp, f"{path}: {name}"))
        else:
            with open(path, "rb") as fp:
                _check_size(path, None, *npy_header(fp, str(path)))
    except MoeloadError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise TraceFormatError(f"{path}: not a NumPy .npy/.npz file ({first_line(e)})") from None


def _check_size(path: Path, member: str | None, shape: tuple[int, ...], dtype: np.dtype) -> None:
    n = 1
    for d in shape:
        n *= int(d)
    nbytes = n * max(8, dtype.itemsize)  # counts become int64
    if nbytes > MAX_DENSE_BYTES:
        what = f"member {member!r} " if member else ""
        raise InputError(
            f"{path}: {what}header claims shape {tuple(int(d) for d in shape)} ({dtype}), "
            f"{nbytes / 1024**3:.3g} GiB as int64, more than the {MAX_DENSE_BYTES // 1024**3} GiB "
            "an import may build"
        )


def read_numpy(source: str | os.PathLike, *, top_k: int | None = None, first_step: int = 0) -> Imported:
    """Read counts from .npy / .npz. Steps default to first_step, first_step + 1, ..."""
    path = Path(source)
    if not path.is_file():
        raise InputError(
            f"{path}: no such file" if not path.exists() else f"{path}: is a directory; give the .npy/.npz file"
        )
    if first_step < 0 or first_step > INT64_MAX:
        raise InputError(f"--first-step {str(first_step)[:40]}: must be in 0..{INT64_MAX} (int64)")
    _check_headers(path)
    meta: dict[str, np.ndarray] = {}
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                keys = list(loaded.files)
                if "counts" in keys:
                    key = "counts"
                elif len(keys) == 1:
                    key = keys[0]
                else:
                    raise TraceFormatError(f"{path}: no 'counts' array (arrays: {keys})")
                arr = loaded[key]
                meta = {k: loaded[k] for k in ("steps", "layers", "experts_per_layer") if k in keys}
        else:
            arr = loaded
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise TraceFormatError(f"{path}: not a NumPy .npy/.npz file ({first_line(e)})") from None
    if arr.ndim != 3:
        raise TraceFormatError(f"{path}: expected counts of shape [steps, layers, experts], got {arr.shape}")
    counts = counts_array(arr, str(path))
    S, L, E = counts.shape
    if L == 0 or E == 0:
        raise TraceFormatError(f"{path}: counts of shape {counts.shape} hold no layer or no expert")
    if first_step + S - 1 > INT64_MAX:
        raise InputError(f"--first-step {first_step}: {S} steps from it go beyond int64 ({INT64_MAX})")
    steps = np.arange(first_step, first_step + S, dtype=np.int64)
    if "steps" in meta:
        steps = counts_array(meta["steps"], f"{path}: steps", what="step numbers").reshape(-1)
        if len(steps) != S or len(np.unique(steps)) != S:
            raise TraceFormatError(f"{path}: 'steps' must hold {S} distinct step numbers")
    names = [f"layer{i}" for i in range(L)]
    if "layers" in meta:
        names = [str(x) for x in np.asarray(meta["layers"]).reshape(-1)]
        if len(names) != L:
            raise TraceFormatError(f"{path}: 'layers' has {len(names)} names for {L} layers")
    experts = [E] * L
    if "experts_per_layer" in meta:
        experts = (
            counts_array(meta["experts_per_layer"], f"{path}: experts_per_layer", what="values").reshape(-1).tolist()
        )
        if len(experts) != L or max(experts) > E or min(experts) < 1:
            raise TraceFormatError(f"{path}: 'experts_per_layer' must hold {L} values in 1..{E}")
        beyond = np.arange(E)[None, :] >= np.asarray(experts)[:, None]  # [L, E]
        if (counts[:, beyond] > 0).any():
            raise TraceFormatError(f"{path}: counts beyond a layer's experts_per_layer are not zero")
    return Imported(
        steps=steps,
        counts=counts[:, None],
        layers=names,
        experts_per_layer=experts,
        top_k=top_k or 1,
        framework="numpy",
        extra={} if top_k else {"top_k_known": False},
    )
