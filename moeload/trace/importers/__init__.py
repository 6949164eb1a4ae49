"""Importers: other tools' expert-load logs -> moeload traces (one module per format).

`import_trace(fmt, source, dest, **options)` reads `source`, writes a new trace at `dest` (which
appears only when complete) and returns its path; `available()` lists formats; `options(fmt)`
lists a format's keyword options.
Bad or malformed input raises InputError / TraceFormatError with the file and the problem.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moeload.errors import InputError
from moeload.trace.importers._common import Imported, check_dest, write
from moeload.trace.importers.arrays import read_numpy
from moeload.trace.importers.megatron import read_router_trace, read_tokens_per_expert
from moeload.trace.importers.sglang import read_sglang
from moeload.trace.importers.tabular import read_csv

READERS: dict[str, Callable[..., Imported]] = {
    "csv": read_csv,
    "numpy": read_numpy,
    "megatron-tpe": read_tokens_per_expert,
    "megatron-router-trace": read_router_trace,
    "sglang": read_sglang,
}


def available() -> list[str]:
    """Format names accepted by `import_trace`."""
    return list(READERS)


def options(fmt: str) -> list[str]:
    """Keyword options of format `fmt`."""
    return [p.name for p in inspect.signature(_reader(fmt)).parameters.values() if p.kind is p.KEYWORD_ONLY]


def _reader(fmt: str) -> Callable[..., Imported]:
    if fmt not in READERS:
        raise InputError(f"format: unknown {fmt!r}; available: {', '.join(READERS)}")
    return READERS[fmt]


def import_trace(
    fmt: str,
    source: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    check: Callable[[Imported], None] | None = None,
    **opts: Any,
) -> Path:
    """Convert `source` (a file or directory in format `fmt`) into a new trace directory `dest`.

    `dest` appears only complete (built in a hidden sibling and renamed; see `_common.write`).
    check: called with what was read, once it is known to make a valid trace and before anything is
    written; it raises to refuse the import.
    """
    reader = _reader(fmt)
    unknown = sorted(set(opts) - set(options(fmt)))
    if unknown:
        raise InputError(f"format {fmt!r}: option(s) {unknown} do not apply; it accepts {options(fmt)}")
    for k, v in opts.items():
        if isinstance(v, int) and not isinstance(v, bool) and v < 1 and k != "first_step":
            raise InputError(f"option {k}={v}: must be >= 1")
    check_dest(dest)  # fail before reading a large source
    return write(reader(source, **opts), dest, source, check=check)


__all__ = ["Imported", "available", "import_trace", "options"]
