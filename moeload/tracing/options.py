"""LoadTracer's scalar arguments, checked before anything is built: one InputError line each."""

from __future__ import annotations

from typing import Any

from moeload.errors import InputError

MAX_FLUSH_EVERY = 1_000_000
"""Largest `flush_every`: one block of steps lives in a device buffer, so it is bounded before allocating."""


def check_options(
    *,
    flush_every: Any,
    kept: Any,
    ranks: Any,
    gate_output: Any,
    path: Any,
    sink: Any,
    per_micro_batch: Any,
    max_micro_batches: Any,
    hooks_in_graph: Any,
    max_pending: Any,
    flush_timeout: Any,
) -> None:
    """InputError naming the first bad argument of LoadTracer(...)."""
    if isinstance(flush_every, bool) or not isinstance(flush_every, int) or not 1 <= flush_every <= MAX_FLUSH_EVERY:
        raise InputError(
            f"flush_every={flush_every!r}: must be an integer in 1..{MAX_FLUSH_EVERY:,} "
            "(the device buffer holds one block of steps)"
        )
    if kept not in (True, False, "always"):
        raise InputError(f"kept={kept!r}: expected True, False or 'always'")
    if ranks not in ("auto", True, False):
        raise InputError(f"ranks={ranks!r}: expected 'auto', True or False")
    if gate_output not in ("auto", "logits", "mask"):
        raise InputError(f"gate_output={gate_output!r}: expected 'auto', 'logits' or 'mask'")
    if path is None and sink is None:
        raise InputError("LoadTracer: give a trace path or a sink (or both)")
    if not isinstance(per_micro_batch, bool):
        raise InputError(f"per_micro_batch={per_micro_batch!r}: expected True or False")
    if (
        isinstance(max_micro_batches, bool)
        or not isinstance(max_micro_batches, int)
        or not 1 <= max_micro_batches <= 4096
    ):
        raise InputError(
            f"max_micro_batches={max_micro_batches!r}: must be an integer in 1..4096 (device buffer slots)"
        )
    if not isinstance(hooks_in_graph, bool):
        raise InputError(f"hooks_in_graph={hooks_in_graph!r}: expected True or False")
    if max_pending is not None and (
        not isinstance(max_pending, int) or isinstance(max_pending, bool) or max_pending < 1
    ):
        raise InputError(
            f"max_pending={max_pending!r}: must be None or a positive integer (blocks waiting for the writer)"
        )
    if flush_timeout is not None and (
        isinstance(flush_timeout, bool) or not isinstance(flush_timeout, (int, float)) or not flush_timeout > 0
    ):
        raise InputError(f"flush_timeout={flush_timeout!r}: must be a positive number of seconds or None")
