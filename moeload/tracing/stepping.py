"""LoadTracer.step() and the flush it triggers every `flush_every` steps: host-side tokens into the block,
the flush collective, the hand-off to the writer thread (BlockWriter), stopping after a failed collective,
and what the writer thread reports back (NaN layers, stalled copies, errors, the manifest's notes)."""

from __future__ import annotations

import threading
import time
import warnings
from typing import Any

import numpy as np
import torch

from moeload.errors import InputError, first_line
from moeload.tracing.block import NAN_COL, TOKENS_COL
from moeload.tracing.collective import all_gather
from moeload.tracing.compiled import CompileChecks
from moeload.tracing.hooks import GateHooks


class StepFlush(GateHooks, CompileChecks):
    """The part of LoadTracer that closes steps and flushes blocks."""

    def step(self) -> None:
        """Close one optimizer step (all counted forwards since the previous call); flush every `flush_every`."""
        if self.tracing_stopped is not None and not self._closed:
            self._first_step += 1
            return
        if self._buf is None:
            raise InputError(
                "LoadTracer.step() before start() (or after close()): use `with tracer:` or tracer.start() "
                "before the first forward, so that step's forwards are counted"
            )
        if self._thread is None:
            self._thread = threading.get_ident()
        elif threading.get_ident() != self._thread:
            raise InputError(
                f"LoadTracer.step() from thread {threading.current_thread().name!r}: a tracer is stepped by "
                "one thread (the one that stepped it first: the training loop's); steps from several "
                "threads would race on the step's slot"
            )
        w = self._writer  # what the writer found in blocks before this step()'s flush: a fixed point to act
        assert w is not None  # start() made it after the buffer
        if (w.stalled is not None and not self._warned_stall) or not w.nan_layers.empty():
            self._poll_writer()
        self._check_forwards()
        self._fold_live()
        self._fold_nan()
        if self._mb is not None:
            self._mb_used = max(self._mb_used, min(max(self._mb_calls, default=0), self.max_micro_batches))
            self._mb_calls[:] = [0] * len(self._mb_calls)
        self._times[self._slot] = time.time()
        self._slot += 1
        if self._slot == self.flush_every:
            self._check_silent()
            self._flush()
        self._snap_bias()
        if self._warn_writer:
            self._warn_writer = False
            warnings.warn(
                f"moeload: trace writing failed ({self.errors[-1]}); training continues, see tracer.errors",
                RuntimeWarning,
                stacklevel=2,
            )

    def _fold_nan(self) -> None:
        """The step's deferred NaN checks into its slot: a gate whose probability sum (taken at its first
        forward of the step, `_nan_and_tokens`) is NaN adds 1 to its row's NAN_COL. Two launches per step
        for all gates, no sync."""
        ns = self._nan_sums
        if ns is None or self._buf is None:
            return
        self._buf[self._slot, :, :, NAN_COL].add_(torch.isnan(ns))
        ns.zero_()

    def _fold_live(self) -> None:
        """Add the rows that compiled hooks wrote for this step into its slot (two launches, no sync)."""
        if self._live is None or self._buf is None:
            return
        self._buf[self._slot] += self._live
        self._live.zero_()
        if self._compiled_layers and self._mb is not None and self.micro_batches_stopped is None:
            step = self.step_count
            self.micro_batches_stopped = {
                "step": step,
                "reason": "gates run inside torch.compile graphs, whose hooks add to the step's rows "
                "only; step totals stay exact",
            }
            warnings.warn(
                f"moeload: micro-batch rows stop at step {step}: traced gates run compiled (per_micro_batch "
                "needs eager gates); step totals stay exact",
                RuntimeWarning,
                stacklevel=3,
            )

    def _flush(self, collective: bool = True) -> None:
        n = self._slot
        if n == 0 or self._buf is None or self._writer is None or self.tracing_stopped is not None:
            return
        src, micro = self._buf, None
        self._add_host_tokens(n)
        if self._mb is not None:  # micro-batch rows add up to the step's routed row
            self._buf[:n, self.layout.routed] += self._mb[:n].sum(1)
            micro = self._mb
        if self._gathered is not None:
            if not collective:
                self._reset(n)
                return
            first = self._first_step
            self.collectives += 1
            try:
                all_gather(self._gathered, self._buf, self._pg, self.flush_timeout)
                if self._mb is not None:  # per_micro_batch: a second collective
                    assert self._mb_gathered is not None  # allocated with _gathered where _mb is
                    self.collectives += 1
                    all_gather(self._mb_gathered, self._mb, self._pg, self.flush_timeout)
                    micro = self._mb_gathered
            except Exception as e:  # timed out, or a peer is gone (gloo fails at once on a closed connection)
                self._reset(n)
                self._stop(first, first + n - 1, f"flush collective failed: {type(e).__name__}: {first_line(e, 160)}")
                return
            src = self._gathered
        steps = np.arange(self._first_step, self._first_step + n, dtype=np.int64)
        if micro is not None:
            micro = micro.narrow(micro.dim() - 3, 0, max(1, self._mb_used))
        until = None if self.micro_batches_stopped is None else self.micro_batches_stopped["step"]
        self._writer.submit(src, steps, self._times[:n].copy(), micro=micro, micro_until=until)
        self.flushes += 1
        self._reset(n)

    def _add_host_tokens(self, n: int) -> None:
        """Add the tokens tallied on the host (from shapes) into the TOKENS_COL bins of the block's first
        n slots: one host->device copy per flush (pinned and asynchronous on CUDA, no host wait)."""
        for host, dev in ((self._host_tok, self._buf), (self._host_tok_mb, self._mb)):
            if host is None or dev is None or not host[:n].any():
                continue
            dst = dev[:n, ..., TOKENS_COL]
            if dst.device.type == "cpu":
                dst.add_(torch.from_numpy(host[:n]))
                continue
            self._staging = [(t, ev) for t, ev in self._staging if not ev.query()]
            staged = torch.from_numpy(host[:n]).pin_memory()  # a pinned copy: the tally is reset after
            dst.add_(staged.to(dst.device, non_blocking=True))
            ev = torch.cuda.Event()
            ev.record()
            self._staging.append((staged, ev))  # kept alive until the copy is done

    def _reset(self, n: int) -> None:
        assert self._buf is not None  # called by _flush, which checks it
        self._buf.zero_()
        if self._host_tok is not None:
            self._host_tok[:] = 0
        if self._host_tok_mb is not None:
            self._host_tok_mb[:] = 0
        if self._mb is not None:
            self._mb.zero_()
            self._mb_used = 0
        self._first_step += n
        self._slot = 0

    def _stop(self, first: int, last: int, reason: str) -> None:
        """This rank stops tracing: hooks removed, no more collectives, steps first..last (the failed
        block) lost; the writer writes what it holds and the manifest (`extra.tracing_stopped`)."""
        assert self._writer is not None  # called by _flush, which checks it
        self.tracing_stopped = {"step": first, "reason": reason}
        for h in self._handles.values():
            h.remove()
        self._handles.clear()
        self._writer.lose_block(first, last, reason)
        self.errors.append(f"tracing stopped at step {first}: {reason}")
        warnings.warn(
            f"moeload: tracing stopped on rank {self.rank} at step {first} ({reason}); later steps are not "
            "recorded (manifest extra.tracing_stopped), earlier blocks stay; training continues",
            RuntimeWarning,
            stacklevel=4,
        )
        self._writer.close()

    def _poll_writer(self) -> None:
        """On the main thread: disable the layers the writer thread found NaN in; warn once about a
        block whose device->host copy was given up (NCCL: a dead or slow peer)."""
        w = self._writer
        assert w is not None  # called by step() and close() with a writer
        while not w.nan_layers.empty():
            g, step, ranks = w.nan_layers.get()
            li = self._slot_of.get(g)
            if li is None:  # another rank's layer: its own tracer removes the hook
                continue
            self._disable(li, f"NaN in the router probabilities at step {step} on rank(s) {ranks}", None)
        if w.stalled is not None and not self._warned_stall:
            self._warned_stall = True
            self.errors.append(f"flush: {w.stalled}")
            warnings.warn(
                f"moeload: a flushed block did not reach the host ({w.stalled}); its steps are listed in the "
                "manifest's extra.lost_steps; tracing and training continue",
                RuntimeWarning,
                stacklevel=3,
            )

    # ---- errors and notes -------------------------------------------------------------------------
    def _on_writer_error(self, msg: str) -> None:
        first = not any(e.startswith("writer:") for e in self.errors)
        self.errors.append(f"writer: {msg}")
        if first:
            self._warn_writer = True

    def _notes(self) -> dict[str, Any]:
        """On the writer thread: notes for the manifest's `extra`; gates that never ran go into the writer's
        `disabled_layers` (its own thread's dict, so one dict holds every reason)."""
        notes: dict[str, Any] = {"hook_errors": dict(self._hook_errors)} if self._hook_errors else {}
        if self.bias_layers:
            notes["router_bias_layers"] = list(self.bias_layers)
        if self.per_micro_batch:
            notes["per_micro_batch"] = {"max_micro_batches": self.max_micro_batches}
        if self.micro_batches_stopped is not None:
            notes["micro_batches_stopped"] = dict(self.micro_batches_stopped)
        if self._bias_errors:
            notes["bias_errors"] = dict(self._bias_errors)
        if len(self.manifest.rank_map_changes) != self._map_changes_noted:  # record_rank_map: write the manifest
            self._map_changes_noted = len(self.manifest.rank_map_changes)
            if self._writer is not None:
                self._writer.note_changed()
        if self.tracing_stopped is not None:
            notes["tracing_stopped"] = dict(self.tracing_stopped)
        if self._no_forward_steps:
            notes["no_forward_steps"] = [list(r) for r in self._no_forward_steps]
            if self._no_forward_more:
                notes["no_forward_steps_more"] = self._no_forward_more
        if self.dynamo_reset is not None:
            notes["dynamo_reset"] = dict(self.dynamo_reset)
        for name, entry in list(self._silent.items()):
            assert self._writer is not None  # _silent is filled after start() made the writer
            self._writer.disabled.setdefault(name, dict(entry))
        return notes
