"""The tracer's flush path: one device->host copy per block, then a background thread (BlockWriter)
that checks it (`conservation`), writes its parts and keeps the manifest's notes (`notes`). The block's
layout and columns are in `moeload.tracing.block`."""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from moeload.trace import TraceWriter
from moeload.tracing.block import (  # noqa: F401  (re-exported: the block's names were defined here)
    DISABLED_ERROR,
    DISABLED_SHAPE,
    FLAG_COL,
    NAN_COL,
    NAN_REASON,
    REASONS,
    TOKENS_COL,
    FlushedBlock,
    Layout,
    bias_of,
)
from moeload.tracing.notes import VIOLATIONS_CAP, WriterNotes, _os_reason, _remove, _unchecked  # noqa: F401
from moeload.tracing.ranks import RankLayout, to_global

AUTO_PENDING_BYTES = 64 << 20
AUTO_PENDING = (4, 64)


class _Job(NamedTuple):
    host: Tensor
    event: Any
    steps: np.ndarray
    times: np.ndarray
    micro: Tensor | None = None
    micro_until: int | None = None


class BlockWriter(WriterNotes):
    """Copies blocks off the device (on the caller's thread, async on CUDA) and writes them on a thread.

    writer: TraceWriter (None on ranks that do not write); sink: called with each FlushedBlock
    (more with `add_sink`), after the block is written (also when writing it failed) and the manifest updated; on_error(message):
    called on the thread when writing or a sink fails (training continues; a failing sink does not stop
    the writing or the other sinks); ranks_recorded: keep one row per rank, else sum over ranks.
    max_pending: host buffers, allocated by `preallocate`, so blocks copied and not yet written (None:
    as many as fit in AUTO_PENDING_BYTES, within AUTO_PENDING); a block submitted while all are in use is dropped (counted, warned about once, its steps listed in
    the manifest's `extra.lost_steps`), so `submit` never waits for the disk. closing(): True once the
    tracer closes; the last block then waits for a buffer instead. top_k: [L] of each layer;
    exact: [L] True where a layer's routes must add up to tokens x top_k (False where its counts
    are taken after capacity dropping: at most that). See `check_conservation`. rank_layout: where
    ranks hold different gates (pipeline stages) or replicate them (tensor parallel), gathered blocks
    hold `rank_layout.width` layer slots per rank and are mapped to the global layers first
    (`ranks.to_global`); a replica whose counts differ from its primary's disables that layer.
    has_bias, bias_rank: [L] where the layout has a bias plane: layers whose router has an expert
    bias, and the rank (block row) to read it from.
    A block whose part fails to be written (disk full, directory gone or read-only) is lost the same
    way; the next block is tried again, and the manifest is rewritten as soon as it can be.
    """

    event_timeout: float | None = None
    """Seconds the thread waits for one block's device->host copy before giving the block up (None: no
    limit); the tracer sets its `flush_timeout` here."""
    stalled: str | None = None
    """Set (on the thread) when a copy was given up: which steps and why."""
    _stuck: Any = None

    def __init__(
        self,
        layout: Layout,
        *,
        writer: TraceWriter | None,
        sink: Callable[[FlushedBlock], None] | None,
        ranks_recorded: bool,
        on_error: Callable[[str], None],
        notes: Callable[[], dict[str, Any]],
        max_pending: int | None = None,
        closing: Callable[[], bool] = lambda: False,
        top_k: Sequence[int] | None = None,
        exact: Sequence[bool] | None = None,
        rank_layout: RankLayout | None = None,
        has_bias: Sequence[bool] | None = None,
        bias_rank: Sequence[int] | None = None,
        event_timeout: float | None = None,
    ) -> None:
        self.event_timeout = event_timeout
        self.layout = layout
        self.rank_layout = rank_layout
        self.has_bias = [False] * len(layout.layers) if has_bias is None else list(has_bias)
        self.bias_rank = [0] * len(layout.layers) if bias_rank is None else list(bias_rank)
        self.writer = writer
        self.sinks: tuple[Callable[[FlushedBlock], None], ...] = () if sink is None else (sink,)
        self.ranks_recorded = ranks_recorded
        self.on_error = on_error
        self.notes = notes
        self.max_pending = max_pending
        self.closing = closing
        L = len(layout.layers)
        self.top_k = [1] * L if top_k is None else [int(k) for k in top_k]
        self.exact = [True] * L if exact is None else [bool(x) for x in exact]
        self.last_flushed_step: int | None = None
        self.disabled: dict[str, dict[str, Any]] = {}
        self.nan_layers: queue.SimpleQueue[tuple[int, int, list[int]]] = queue.SimpleQueue()
        self.dropped_blocks = 0
        """Blocks dropped by this writer because all `max_pending` buffers were in use."""
        self.buffers_allocated = 0
        """Host buffers allocated so far (`max_pending`, plus replacements of a wrong shape)."""
        self.micro_lost: list[dict[str, Any]] = []
        """Steps whose micro-batch rows could not be written (their step totals were)."""
        self.write_seconds = 0.0
        """Time the thread spent on blocks (check, parts, sinks, manifest): its busy time."""
        ex: dict[str, Any] = writer.manifest.extra if writer is not None else {}
        self.lost_steps: list[dict[str, Any]] = [
            dict(e)
            for e in ex.get("lost_steps", [])
            if isinstance(e, dict) and isinstance(e.get("first"), int) and isinstance(e.get("last"), int)
        ]
        self._dropped_before = int(ex.get("dropped_blocks", 0) or 0)
        cons: dict[str, Any] = ex["conservation"] if isinstance(ex.get("conservation"), dict) else {}
        self.checked_blocks = int(cons.get("checked_blocks", 0) or 0)
        self.violations: list[dict[str, Any]] = list(cons.get("violations", []))[:VIOLATIONS_CAP]
        self.violations_total = int(cons.get("violations_total", len(self.violations)) or 0)
        self._open_violations: dict[tuple, tuple[int, int | None]] = {}  # (layer, rank, problem) -> (last step, index)
        self._warned_drop = self._warned_conservation = False
        self._manifest_failing = self._part_failing = self._submitted = False
        self._session_start: int | None = None  # this session's first step (submit), noted in the manifest
        self._session_noted = False
        self._lock = threading.Lock()
        self._written_notes: dict[str, Any] = {}
        self._dirty = False
        self._free: queue.SimpleQueue[Tensor] = queue.SimpleQueue()
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="moeload-trace-writer", daemon=True)
        self._thread.start()

    def add_sink(self, fn: Callable[[FlushedBlock], None]) -> None:
        """Also call `fn` with every block written from now on (the thread reads a new tuple: no lock)."""
        self.sinks = (*self.sinks, fn)

    @property
    def pending(self) -> int:
        """Blocks submitted and not yet done by the thread (host buffers in use)."""
        return (self.max_pending or 0) - self._free.qsize()

    def preallocate(self, like: Tensor, n: int | None = None) -> None:
        """Allocate the host buffers shaped like `like`: `n`, else `max_pending` (sets it where None)."""
        if n is None and self.max_pending is None:
            lo, hi = AUTO_PENDING
            self.max_pending = max(lo, min(hi, AUTO_PENDING_BYTES // max(1, like.numel() * like.element_size())))
        count = self.max_pending if n is None else n
        assert count is not None  # max_pending was set above where n is None
        for _ in range(count):
            self._free.put(self._host_like(like))

    def _host_like(self, src: Tensor) -> Tensor:
        self.buffers_allocated += 1
        return torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)

    def submit(
        self,
        src: Tensor,
        steps: np.ndarray,
        times: np.ndarray,
        micro: Tensor | None = None,
        micro_until: int | None = None,
    ) -> bool:
        """Queue `src` ([F, P, L, W] or [R, F, P, L, W]) for writing; `src` may be reused right after.
        micro: [F, M, L, W] or [R, F, M, L, W] routed rows of each micro-batch (copied off the device
        with the block); micro_until: micro-batch rows of steps from here on are not written (the
        tracer stopped recording them).

        Returns False where the block was dropped: all `max_pending` buffers still wait for the disk.
        """
        steps = np.asarray(steps, np.int64)
        if not self._submitted:
            self._submitted = True
            self._session_start = int(steps[0])
            self._supersede(int(steps[0]))
        try:
            host = self._free.get(block=self.closing())
        except queue.Empty:
            self._drop(steps)
            return False
        if host.shape != src.shape:  # replaces the buffer: the count of buffers stays the same
            host = self._host_like(src)
        event = None
        host_mb = None if micro is None else torch.empty(micro.shape, dtype=micro.dtype, pin_memory=micro.is_cuda)
        if src.is_cuda:
            host.copy_(src, non_blocking=True)
            if host_mb is not None and micro is not None:  # (host_mb is None exactly where micro is)
                host_mb.copy_(micro, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host.copy_(src)
            if host_mb is not None and micro is not None:
                host_mb.copy_(micro)
        self._jobs.put(_Job(host, event, steps, np.asarray(times, np.float64), host_mb, micro_until))
        return True

    def _drop(self, steps: np.ndarray) -> None:
        """On the caller's thread: count the block, list its steps as lost, warn once."""
        self.dropped_blocks += 1
        reason = f"dropped: trace writer behind (all max_pending={self.max_pending} blocks still being written)"
        first, last = int(steps[0]), int(steps[-1])
        self.lose_block(first, last, reason)
        if not self._warned_drop:
            self._warned_drop = True
            warnings.warn(
                f"moeload: the trace writer is behind (max_pending={self.max_pending} blocks not yet written); steps "
                f"{first}..{last} were dropped and are listed in the manifest's extra.lost_steps (later drops are "
                "counted there silently); training continues",
                RuntimeWarning,
                stacklevel=5,  # _drop < submit < _flush < step < the caller
            )

    def close(self) -> None:
        """Write everything queued, then stop the thread; write the manifest's notes a last time."""
        self._jobs.put(None)
        self._thread.join()
        self._dirty = True
        self._update_manifest()

    def _run(self) -> None:
        if self.writer is not None:
            _warm_up_parquet()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            t0 = time.perf_counter()
            blocks: list[FlushedBlock] = []
            sinks = self.sinks  # the sinks attached before this block was written (add_sink: from then on)
            try:
                if self._copied(job):
                    blocks = self._write(job)
            except Exception as e:
                self.on_error(f"writing steps {job.steps[0]}..{job.steps[-1]} failed: {type(e).__name__}: {e}")
            # the manifest first, then the sinks, then the buffer: a sink (or a caller that sees the
            # buffer free) finds the manifest's notes already covering this block
            self._update_manifest()
            self._call_sinks(blocks, sinks)
            self._free.put(job.host)
            self.write_seconds += time.perf_counter() - t0

    def _call_sinks(self, blocks: list[FlushedBlock], sinks: tuple[Callable[[FlushedBlock], None], ...]) -> None:
        for block in blocks:
            for fn in sinks:
                try:
                    fn(block)
                except Exception as e:
                    name = getattr(fn, "__qualname__", type(fn).__name__)
                    self.on_error(
                        f"sink {name} failed on {block.split} steps {block.steps[0]}..{block.steps[-1]}: "
                        f"{type(e).__name__}: {e}"
                    )

    def _copied(self, job: _Job) -> bool:
        """Wait for the job's device->host copy by polling its event (no host-device sync call). False
        where it is not done within `event_timeout` seconds (on CUDA the copy waits on the stream for the
        flush's collective: a dead or slow NCCL peer), or, once the tracer is closing, at once while an
        earlier copy given up is still not done (the stream runs in order, so close() waits about
        `event_timeout` at most); the block's steps are then lost and `stalled` says why."""
        if job.event is None or job.event.query():
            return True
        if self._stuck is not None and not self._stuck.query() and self.closing():
            return self._give_up(job)
        deadline = None if self.event_timeout is None else time.monotonic() + self.event_timeout
        while not job.event.query():
            if deadline is not None and time.monotonic() > deadline:
                self._stuck = job.event
                return self._give_up(job)
            time.sleep(0.0005)
        return True

    def _give_up(self, job: _Job) -> bool:
        reason = (
            f"device->host copy not done within flush_timeout={self.event_timeout:g} s "
            "(it waits for the flush collective: a dead or slow rank)"
        )
        self.lose_block(int(job.steps[0]), int(job.steps[-1]), reason)
        if self.stalled is None:
            self.stalled = f"steps {job.steps[0]}..{job.steps[-1]}: {reason}"
        return False

    def _note_session(self, job: _Job) -> bool:
        """Before this session's first part: the manifest records the step it starts from
        (`sessions[-1]["first_step"]`), so readers hide what an abandoned earlier run wrote from there on
        even where this session's first blocks never reach the disk. False (the block is lost) while
        the manifest cannot be written: no part of this session may land before that note."""
        if self.writer is None or self._session_noted or self._session_start is None:
            return True
        self.writer.manifest.sessions[-1]["first_step"] = self._session_start
        self._dirty = True
        failed = self._update_manifest()
        if failed is not None:
            self.lose_block(
                int(job.steps[0]),
                int(job.steps[-1]),
                f"{failed} (the manifest could not record where this session starts, so no part was written)",
            )
            return False
        self._session_noted = True
        return True

    def _write(self, job: _Job) -> list[FlushedBlock]:
        """Check the block, write its parts -> the FlushedBlocks for the sinks (called by `_run`)."""
        if not self._note_session(job):
            return []
        lay = self.layout
        a = job.host.numpy()
        if a.ndim == 4:
            a = a[None]
        n = len(job.steps)
        a = a[:, :n].transpose(1, 0, 2, 3, 4)  # [S, R, P, L, W]
        if self.rank_layout is not None and job.host.ndim == 5:
            a, bad = to_global(a, self.rank_layout)
            self._note_replicas(bad, job.steps)
        self._note_disabled(a, job.steps)
        if self.writer is not None or job.host.ndim == 4:  # ranks without a writer skip a gathered block
            try:
                self._check(a, job.steps, rank_rows=job.host.ndim == 5)
            except Exception as e:
                self.on_error(
                    f"conservation check of steps {job.steps[0]}..{job.steps[-1]} failed: {type(e).__name__}: {e}"
                )
        E = max(lay.experts_per_layer)
        micro = self._micro(job, E)
        bias = bias_of(a, lay, self.has_bias, self.bias_rank) if a.shape[1] > max(self.bias_rank, default=0) else None
        written = True
        out: list[FlushedBlock] = []
        for split, pr, pk in (("train", lay.routed, lay.kept), ("eval", lay.eval_routed, lay.eval_kept)):
            if pr is None:
                continue
            routed, tokens = a[:, :, pr, :, 1 : E + 1], a[:, :, pr, :, TOKENS_COL]
            kept = a[:, :, pk, :, 1 : E + 1] if pk is not None else None
            steps, times = job.steps, job.times
            if split == "eval":
                seen = tokens.sum((1, 2)) > 0
                if not seen.any():
                    continue
                routed, tokens, steps, times = routed[seen], tokens[seen], steps[seen], times[seen]
                kept = kept[seen] if kept is not None else None
            if not self.ranks_recorded:
                routed, tokens = routed.sum(1, keepdims=True), tokens.sum(1, keepdims=True)
                kept = kept.sum(1, keepdims=True) if kept is not None else None
            block = FlushedBlock(
                split,
                steps.copy(),
                routed.copy(),
                None if kept is None else kept.copy(),
                tokens.copy(),
                times.copy(),
                None if split != "train" or micro is None else micro[0],
                bias if split == "train" else None,
            )
            if self.writer is not None and not self._write_part(block) and split == "train":
                written = False
            elif self.writer is not None and split == "train" and micro is not None:
                self._write_micro(self.writer.last_seq, job, *micro)
            out.append(block)
        if written:
            self.last_flushed_step = int(job.steps[-1])
        return out

    def _micro(self, job: _Job, E: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The job's micro-batch rows -> (routed [S, R, M, L, E], tokens [S, R, M, L]) in global layers,
        summed over ranks where ranks are not recorded; None without micro-batch rows."""
        if job.micro is None:
            return None
        mb = job.micro.numpy()
        if mb.ndim == 4:
            mb = mb[None]
        mb = mb[:, : len(job.steps)].transpose(1, 0, 2, 3, 4)  # [S, R, M, L, W]
        if self.rank_layout is not None and job.micro.ndim == 5:
            mb, _ = to_global(mb, self.rank_layout)  # M takes the place of the planes
        routed, tokens = mb[..., 1 : E + 1], mb[..., TOKENS_COL]
        if not self.ranks_recorded:
            routed, tokens = routed.sum(1, keepdims=True), tokens.sum(1, keepdims=True)
        return routed, tokens

    def _write_micro(self, seq: int, job: _Job, routed: np.ndarray, tokens: np.ndarray) -> None:
        keep = job.steps < (job.micro_until if job.micro_until is not None else np.iinfo(np.int64).max)
        if not keep.any():
            return
        assert self.writer is not None  # the caller checks it
        try:
            self.writer.write_micro_block(seq, job.steps[keep], routed[keep], tokens[keep])
        except OSError as e:
            first, last = int(job.steps[keep][0]), int(job.steps[keep][-1])
            with self._lock:
                self.micro_lost.append({"first": first, "last": last, "reason": _os_reason(e)})
                self._dirty = True
            self.on_error(
                f"writing the micro-batch rows of steps {first}..{last} failed ({_os_reason(e)}); their step "
                "totals are written (manifest extra.micro_lost)"
            )

    def _write_part(self, block: FlushedBlock) -> bool:
        """One part of `block` -> True; where that fails (OSError), its steps are lost, no temporary file
        stays behind, and False."""
        w = self.writer
        assert w is not None  # the caller checks it
        first, last = int(block.steps[0]), int(block.steps[-1])
        tmp = w.temp_part_path(block.split, int(block.steps.min()), int(block.steps.max()))
        try:
            w.write_block(
                block.steps,
                block.routed,
                block.kept,
                block.tokens,
                split=block.split,
                times=block.times,
                bias=block.bias,
            )
        except OSError as e:
            _remove(tmp)
            reason = _os_reason(e)
            self._lose(block.split, first, last, reason)
            self._part_failing = True
            self.on_error(
                f"writing {block.split} steps {first}..{last} failed ({reason}); these steps are lost "
                "(manifest extra.lost_steps), the next block is tried again"
            )
            return False
        self._part_failing = False
        if block.split == "train" and w.manifest.tokens_per_step is None:
            w.manifest.tokens_per_step = int(block.tokens[0, :, 0].sum())
            self._dirty = True
        return True


def _warm_up_parquet() -> None:
    """Write a one-row Parquet table to memory: the first write's setup (about 0.2 s) then happens while
    the first block is recorded, not while later blocks queue up behind it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": pa.array([0], pa.int64())}), pa.BufferOutputStream(), compression="zstd")
