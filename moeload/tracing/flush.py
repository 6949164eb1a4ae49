"""The tracer's flush path: one device->host copy per block, then a background thread that writes it.

Block layout (device and host): `[F, P, L, W]` int64 for one rank, `[R, F, P, L, W]` after the
gather; F = flush_every slots (steps), P planes (train routed, train kept, eval routed, eval kept;
see `Layout`), L layers, W = E_max + 4 columns: 0 no expert / dropped, [1, E_max] experts, E + 1
out-of-range ids (a layer with E < E_max uses its padding), a disabled-layer flag (routed planes),
tokens (last column, routed planes). See `accumulate`.
"""

from __future__ import annotations

import copy
import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from moeload.trace import TraceWriter
from moeload.trace.manifest import MANIFEST_NAME, write_json_atomic

FLAG_COL = -2
TOKENS_COL = -1


class FlushedBlock(NamedTuple):
    """One written block, as given to a `sink`. R = ranks recorded (1 for pre-summed counts)."""

    split: str
    """"train" or "eval"."""
    steps: np.ndarray
    """[S] step numbers."""
    routed: np.ndarray
    """[S, R, L, E] int64 routed counts."""
    kept: np.ndarray | None
    """[S, R, L, E] int64 kept counts, None where not recorded."""
    tokens: np.ndarray
    """[S, R, L] tokens that reached each gate."""
    times: np.ndarray
    """[S] unix seconds at the end of each step."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Plane indices of the block; None where a plane is not recorded."""

    layers: list[str]
    experts_per_layer: list[int]
    routed: int
    kept: int | None
    eval_routed: int | None
    eval_kept: int | None

    @property
    def planes(self) -> int:
        return 1 + sum(p is not None for p in (self.kept, self.eval_routed, self.eval_kept))

    @property
    def width(self) -> int:
        return max(self.experts_per_layer) + 4

    @staticmethod
    def make(layers: list[str], experts_per_layer: list[int], kept: bool, record_eval: bool) -> Layout:
        n = iter(range(4))
        r = next(n)
        k = next(n) if kept else None
        er = next(n) if record_eval else None
        ek = next(n) if record_eval and kept else None
        return Layout(list(layers), list(experts_per_layer), r, k, er, ek)


class _Job(NamedTuple):
    host: Tensor
    event: Any
    steps: np.ndarray
    times: np.ndarray


class BlockWriter:
    """Copies blocks off the device (on the caller's thread, async on CUDA) and writes them on a thread.

    writer: TraceWriter (None on ranks that do not write); sink: called with each FlushedBlock
    (more with `add_sink`), after the block is written; on_error(message): called on the thread when
    writing or a sink fails (training continues; a failing sink does not stop the writing or the
    other sinks); ranks_recorded: keep one row per rank, else sum over ranks.
    """

    def __init__(
        self,
        layout: Layout,
        *,
        writer: TraceWriter | None,
        sink: Callable[[FlushedBlock], None] | None,
        ranks_recorded: bool,
        on_error: Callable[[str], None],
        notes: Callable[[], dict[str, Any]],
    ) -> None:
        self.layout = layout
        self.writer = writer
        self.sinks: tuple[Callable[[FlushedBlock], None], ...] = () if sink is None else (sink,)
        self.ranks_recorded = ranks_recorded
        self.on_error = on_error
        self.notes = notes
        self.last_flushed_step: int | None = None
        self.disabled: dict[str, dict[str, Any]] = {}
        self._written_notes: dict[str, Any] = {}
        self._dirty = False
        self._free: queue.SimpleQueue[Tensor] = queue.SimpleQueue()
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="moeload-trace-writer", daemon=True)
        self._thread.start()

    def add_sink(self, fn: Callable[[FlushedBlock], None]) -> None:
        """Also call `fn` with every block written from now on (the thread reads a new tuple: no lock)."""
        self.sinks = (*self.sinks, fn)

    def preallocate(self, like: Tensor, n: int = 2) -> None:
        for _ in range(n):
            self._free.put(self._host_like(like))

    @staticmethod
    def _host_like(src: Tensor) -> Tensor:
        return torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)

    def submit(self, src: Tensor, steps: np.ndarray, times: np.ndarray) -> None:
        """Queue `src` ([F, P, L, W] or [R, F, P, L, W]) for writing; `src` may be reused right after."""
        try:
            host = self._free.get_nowait()
            if host.shape != src.shape:
                host = self._host_like(src)
        except queue.Empty:
            host = self._host_like(src)
        event = None
        if src.is_cuda:
            host.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host.copy_(src)
        self._jobs.put(_Job(host, event, np.asarray(steps, np.int64), np.asarray(times, np.float64)))

    def close(self) -> None:
        """Write everything queued, then stop the thread."""
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                if job.event is not None:
                    while not job.event.query():  # polling: no host-device sync call at all
                        time.sleep(0.0005)
                self._write(job)
            except Exception as e:
                self.on_error(f"writing steps {job.steps[0]}..{job.steps[-1]} failed: {type(e).__name__}: {e}")
            finally:
                self._free.put(job.host)

    def _write(self, job: _Job) -> None:
        lay = self.layout
        a = job.host.numpy()
        if a.ndim == 4:
            a = a[None]
        n = len(job.steps)
        a = a[:, :n].transpose(1, 0, 2, 3, 4)  # [S, R, P, L, W]
        self._note_disabled(a[:, :, lay.routed, :, FLAG_COL], job.steps)
        E = max(lay.experts_per_layer)
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
            block = FlushedBlock(split, steps.copy(), routed.copy(), None if kept is None else kept.copy(), tokens.copy(), times.copy())
            if self.writer is not None:
                self.writer.write_block(block.steps, block.routed, block.kept, block.tokens, split=split, times=block.times)
                if split == "train" and self.writer.manifest.tokens_per_step is None:
                    self.writer.manifest.tokens_per_step = int(block.tokens[0, :, 0].sum())
                    self._dirty = True
            for fn in self.sinks:
                try:
                    fn(block)
                except Exception as e:
                    name = getattr(fn, "__qualname__", type(fn).__name__)
                    self.on_error(f"sink {name} failed on {split} steps {steps[0]}..{steps[-1]}: {type(e).__name__}: {e}")
        self._update_manifest()
        self.last_flushed_step = int(job.steps[-1])

    def _note_disabled(self, flags: np.ndarray, steps: np.ndarray) -> None:
        """flags: [S, R, L] > 0 where a layer's hook was disabled in that step on that rank."""
        for s, r, li in zip(*np.nonzero(flags > 0)):
            entry = self.disabled.setdefault(self.layout.layers[li], {"step": int(steps[s]), "ranks": []})
            if int(r) not in entry["ranks"]:
                entry["ranks"].append(int(r))

    def _update_manifest(self) -> None:
        if self.writer is None:
            return
        notes = {**self.notes(), **({"disabled_layers": self.disabled} if self.disabled else {})}
        if notes == self._written_notes and not self._dirty:
            return
        m = self.writer.manifest
        m.extra.update(notes)
        write_json_atomic(Path(self.writer.path) / MANIFEST_NAME, m.to_dict())
        self._written_notes = copy.deepcopy(notes)
        self._dirty = False
