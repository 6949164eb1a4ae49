"""LoadTracer: per-step expert counts of every MoE gate, accumulated on the device, written in blocks."""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from moeload.errors import InputError, NoGatingModulesError, first_line
from moeload.trace import Manifest, TraceWriter
from moeload.trace import lock as trace_lock
from moeload.trace.layout import contiguous_expert_to_rank
from moeload.tracing.accumulate import KernelCache, accumulate, as_routing
from moeload.tracing.adapters import Adapter, GateSpec, GenericAdapter, RoutingShapeError, discover, registered_adapters
from moeload.tracing.adapters.base import find_bias
from moeload.tracing.block import (
    DISABLED_ERROR,
    DISABLED_SHAPE,
    FLAG_COL,
    NAN_REASON,
    REASONS,
    TOKENS_COL,
    FlushedBlock,
    Layout,
)
from moeload.tracing.collective import all_gather, all_gather_object, tracer_group
from moeload.tracing.flush import BlockWriter
from moeload.tracing.ranks import RankLayout, describe, reconcile

MAX_FLUSH_EVERY = 1_000_000
"""Largest `flush_every`: one block of steps lives in a device buffer, so it is bounded before allocating."""

_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)
_cache_entries: Callable[[Any], list[Any]] | None
try:  # private, present since torch 2.1: the compiled code dynamo holds for one code object
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list as _cache_entries
except ImportError:  # pragma: no cover - torch builds without dynamo
    _cache_entries = None
NO_FORWARD_CAP = 100
"""Ranges of steps without gate forwards kept in `extra.no_forward_steps`; later ones are only counted."""


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread (checkpoint recomputes)."""
    return _graph_task_id() != -1


class LoadTracer:
    """Records how many tokens each expert of each MoE layer receives at every optimizer step.

    ::

        tracer = LoadTracer(model, "runs/exp1.moeload", flush_every=100)
        with tracer:                       # or tracer.start() ... tracer.close()
            for batch in loader:
                ...; loss.backward(); optimizer.step()
                tracer.step()              # closes one optimizer step

    Which forwards count (the exact rule): a forward of a gating module counts in the "train"
    split iff (1) the module is in training mode and (2) it does not run inside an autograd
    backward pass (``torch._C._current_graph_task_id() == -1``). Grad mode is not consulted.
    Activation-checkpoint recomputes run inside backward, so with ``torch.utils.checkpoint``
    (reentrant or not) every checkpointed forward counts once: the original forward counts (it runs
    under ``no_grad`` in the reentrant variant), the recompute does not. Eval-mode forwards are
    ignored, or counted in the "eval" split at the current step number with ``record_eval=True``.
    Everything counted between two ``step()`` calls is one step (micro-batches are summed, or kept with
    ``per_micro_batch``). ``step()`` must always come from one thread, the one that called it first
    (InputError otherwise: two threads stepping one tracer would race on the step's slot). Steps
    are numbered from 0, or from the step restored by ``load_state_dict``. Hooks are installed by
    ``start()`` (or ``with``); ``step()`` before it raises InputError.

    Hot path: hooks add into a preallocated device buffer ``[flush_every, planes, L, E + 3]`` with
    ``index_add_`` / ``add_`` only (no host sync, no I/O); ``step()`` advances a host-side slot
    index. Every ``flush_every`` steps: at most one collective, one async device->host copy (pinned
    memory + CUDA event), and a background thread writes one Parquet part per split.

    torch.distributed: every rank of ``group`` (default: the world) must create the tracer and call
    ``step()`` and ``close()`` equally often, in lockstep, since a flush is a collective
    (``all_gather_single`` of the block). Rank 0 writes the trace; with ``ranks="auto"`` and more
    than one rank, parts hold one row per rank (``ranks=False``: the sum only). ``close()`` inside a
    failing ``with`` block skips the collective, so a crashed distributed run loses its partial block.

    Parallel layouts. Each rank traces the gates it holds; the constructor is a collective (on a gloo
    group of the tracer's own): every rank declares its gates by layer name (megatron-core: the global
    layer number, so pipeline stages do not collide) and the ranks agree once on the union of layers
    and on each layer's owners (`rank_layout`, `moeload.tracing.ranks`). Pipeline stages (even or
    uneven, a stage without MoE layers included) each fill their own layers; data- and expert-parallel
    replicas of a layer are summed; ranks of ``tp_group`` after its first (tensor parallel without
    sequence parallel: the same router on the same tokens; megatron-core's TP group is found by
    itself in that case) are compared with the first and counted once (a difference disables the
    layer in the manifest: they were no replicas). Every rank's buffer has the same agreed shape, so a
    flush cannot fail on sizes. What cannot be reconciled (different ``flush_every``, ``record_eval``,
    ``kept`` or ``ranks``; one layer with different experts, top-k, count kind or expert map) raises
    InputError in the constructor on every rank alike, before training starts. The manifest lists
    ``extra.layer_owners`` ({layer: ranks}) and ``extra.replica_ranks`` where not every rank holds
    every layer. `layers` is the trace's (global) layer list; `local_layers` this rank's gates.

    Resume after a crash: a run that dies after flushing steps past its last checkpoint, and resumes
    from that checkpoint (``load_state_dict`` with the checkpoint's ``state_dict()``, or a callback
    numbering steps by the framework's counter), writes those step numbers again into the same
    ``path``. Nothing is deleted: the store keeps both parts and readers take each step from the
    part written last; once the resumed run has written its first block (starting at step N), the
    first run's steps >= N are superseded (hidden from reads, listed by ``Trace.superseded()``),
    even those the resumed run has not reached yet. Sinks see only the new blocks.

    Count kinds (manifest ``count_kind``): "routed" where every gate shows its routes before
    capacity dropping; "both" where at least one gate also reports drops (and ``kept`` allows),
    then the ``kept`` column of other gates equals their routed counts; "kept" where every gate's
    routing is taken after dropping (``GateSpec.count_kind == "kept"``, e.g. megatron-core with a
    capacity factor): both columns then hold those kept counts. Where layers differ, the manifest
    says "both" and ``extra.layer_count_kinds`` lists each layer's kind ([L] of "routed" | "kept" |
    "both"); the ``routed`` column of a "kept" layer holds its kept counts.

    Failures never reach training. A hook fault disables that layer on that rank: its hook is
    removed, one warning per layer, the manifest's ``extra.disabled_layers[layer] = {"step", "ranks",
    "reason"}`` (and ``extra.hook_errors`` the message); other layers go on counting. Faults: the
    adapter raises; the router's output has an unexpected shape (``RoutingShapeError``); NaN router
    probabilities (adapters pass them as ``Routing.probs``; the hook adds ``isnan(probs).any()`` into the
    block on the device, no host sync; the writer thread reads it when the block is flushed and the
    hook is removed at the next ``step()`` on every rank, since every rank sees the gathered block).
    A writer failure (e.g. disk full) warns once and is listed in ``errors``. A killed process loses
    only its unflushed steps.

    torch.compile, in either order. Attached before the model runs compiled, the hooks are traced into
    dynamo's graph and counts are exact. Dynamo does not call hooks added to a module it has already
    compiled, so where ``start()`` finds compiled code for the model or a module between it and a gate
    (``torch.compile(model)``, ``module.compile()``, per-block compile; read from dynamo's cache), it calls
    ``torch.compiler.reset()``, which is global: every compiled function of the process recompiles once
    at its next call (one warning, manifest ``extra.dynamo_reset = {"step", "modules"}``). Not seen at
    ``start()``: a compiled function that calls the model (a compiled training step). Each hook counts
    its calls on the host (a Python int, no sync), so such a run shows: a step in which no gate ran is
    warned about once and listed in ``extra.no_forward_steps`` ([[first, last], ...], the first
    NO_FORWARD_CAP ranges; steps in later ones counted in ``no_forward_steps_more``); a gate that never
    ran through the first block (or until ``close()``) goes to ``extra.disabled_layers`` with the reason
    (its hook stays; in a multi-rank run, as rank 0 saw it). Layer names drop the ``_orig_mod`` segments of
    compiled wrappers, so eager and compiled runs name layers alike.

    Dead or slow ranks (``flush_timeout``, seconds, default 300; None waits as long as the backend
    does). CPU buffers (gloo): the flush's collective runs on a gloo group of the tracer's own (made
    by ``start()``, with ``flush_timeout`` as its timeout, so it never mixes with training's
    collectives) and ``step()`` waits at most ``flush_timeout`` for it. Where it times out or fails
    (a dead peer fails it at once), this rank stops tracing: one warning, hooks removed, no more
    collectives, the block's steps listed in ``extra.lost_steps``, ``extra.tracing_stopped = {"step",
    "reason"}`` in the manifest (rank 0), blocks written before stay valid, training continues. A
    late peer then fails its own collective and stops the same way. CUDA buffers (NCCL): the
    collective never blocks the host; the device->host copy waits for it on the stream, and the
    writer thread gives a block up after ``flush_timeout`` (steps in ``extra.lost_steps``, one warning;
    tracing goes on in lockstep, so ``close()`` returns within about ``flush_timeout``). A dead NCCL
    peer also stalls the training's own collectives: PyTorch's NCCL watchdog then aborts after the
    process group's timeout (``init_process_group(timeout=...)``, 10 min by default for NCCL) and, with
    ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3`` (the default), tears the process down; the trace keeps every
    block written before.

    Arguments (keyword-only after ``path``): path: trace directory (appended to if it holds the same
    model); tp_group: the tensor-parallel group, where its ranks run the same routers on the same tokens
    (no sequence parallelism; see "Parallel layouts"); sink: ``fn(FlushedBlock)`` called on the writer thread after each block (every rank; more
    with ``add_sink``; an exception in a sink is reported like a writer failure and skips nothing else);
    flush_every: steps per block; record_eval; kept: record kept (after capacity dropping) counts
    when a gate's adapter reports drops (True), never (False), or always ("always": gates without
    drop information record kept = routed; generic gates read a kept field from their output); ranks: "auto" | True | False; group: process group; gates: module
    path patterns and gate_types: classes for the generic adapter (with num_experts / top_k where
    the module does not tell; gate_output: "auto" | "logits" | "mask", how it reads a floating
    [.., E] output, see ``GenericAdapter``; refused without gates / gate_types); adapters: replaces auto-discovery; device: of the count buffer
    (default: the first gate's parameters); model_name, tokens_per_step, extra: manifest fields;
    fsync: each part before it becomes visible; max_pending: blocks copied to host memory and not yet
    written (the host buffers, allocated by ``start()``; default: as many as fit in 64 MiB, 4 to 64): a flush finding all of them still waiting
    for the disk drops its block instead of waiting (counted in ``dropped_blocks``, warned about once,
    listed in the manifest's ``extra.lost_steps``; the last block at ``close()`` waits instead).
    Disk faults (directory gone or read-only, disk full) lose the failing block the same way
    (``extra.lost_steps`` with the error); the next block is tried again. Every flushed block is checked
    on the writer thread: routes of each (step, rank, layer) must add up to tokens x top_k; violations
    are warned about once and listed in ``extra.conservation`` (nothing is dropped).
    """

    def __init__(
        self,
        model: nn.Module,
        path: str | os.PathLike | None = None,
        *,
        flush_every: int = 100,
        record_eval: bool = False,
        kept: bool | str = True,
        ranks: str | bool = "auto",
        sink: Callable[[FlushedBlock], None] | None = None,
        group: Any = None,
        gates: Sequence[str] | str | None = None,
        gate_types: Sequence[type] | type | None = None,
        num_experts: int | None = None,
        top_k: int | None = None,
        adapters: Sequence[Adapter] | None = None,
        device: str | torch.device | None = None,
        model_name: str | None = None,
        tokens_per_step: int | None = None,
        extra: dict[str, Any] | None = None,
        fsync: bool = True,
        flush_timeout: float | None = 300.0,
        max_pending: int | None = None,
        gate_output: str = "auto",
        tp_group: Any = None,
        per_micro_batch: bool = False,
        max_micro_batches: int = 16,
    ) -> None:
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or not 1 <= flush_every <= MAX_FLUSH_EVERY:
            raise InputError(f"flush_every={flush_every!r}: must be an integer in 1..{MAX_FLUSH_EVERY:,} "
                             "(the device buffer holds one block of steps)")
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
        if isinstance(max_micro_batches, bool) or not isinstance(max_micro_batches, int) or not 1 <= max_micro_batches <= 4096:
            raise InputError(f"max_micro_batches={max_micro_batches!r}: must be an integer in 1..4096 (device buffer slots)")
        self.per_micro_batch, self.max_micro_batches = per_micro_batch, max_micro_batches
        if max_pending is not None and (not isinstance(max_pending, int) or isinstance(max_pending, bool) or max_pending < 1):
            raise InputError(f"max_pending={max_pending!r}: must be None or a positive integer (blocks waiting for the writer)")
        if flush_timeout is not None and (isinstance(flush_timeout, bool) or not isinstance(flush_timeout, (int, float))
                                          or not flush_timeout > 0):
            raise InputError(f"flush_timeout={flush_timeout!r}: must be a positive number of seconds or None")
        self.flush_timeout = None if flush_timeout is None else float(flush_timeout)
        self.model = model
        self.path = None if path is None else os.fspath(path)
        self.flush_every = flush_every
        self.record_eval = record_eval
        self.sink = sink
        self._sinks: list[Callable[[FlushedBlock], None]] = [] if sink is None else [sink]
        self.group = group
        self.fsync = fsync
        self.max_pending = max_pending
        tried = list(registered_adapters() if adapters is None else adapters)
        if gates or gate_types:
            tried.insert(0, GenericAdapter(gates or (), gate_types or (), num_experts=num_experts, top_k=top_k,
                                           has_kept=kept == "always", gate_output=gate_output))
        elif gate_output != "auto":
            raise InputError(f"gate_output={gate_output!r}: applies to gates chosen with gates= or gate_types= only")
        self.world_size, self.rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.world_size = torch.distributed.get_world_size(group)
            self.rank = torch.distributed.get_rank(group)
        try:
            self.specs: list[GateSpec] = discover(model, tried)
        except NoGatingModulesError:
            if self.world_size == 1:
                raise
            self.specs = []  # a pipeline stage without MoE layers still joins the agreement and the flushes
        parents = {id(c): m for m in model.modules() for c in m.children()}
        for s in self.specs:
            if s.bias is None:
                s.bias = find_bias(s.module, parents.get(id(s.module)), s.num_experts)
        self.local_layers = [plain_name(s.name) for s in self.specs]
        """This rank's gates (hook and buffer slot order); `layers` is the trace's global list."""
        self.errors: list[str] = []
        self.tracing_stopped: dict[str, Any] | None = None
        """{"step", "reason"} once a flush's collective failed or timed out on this rank (tracing stopped)."""
        self._cpu_pg: Any = None
        declared = {"layers": [describe(n, s.num_experts, s.top_k, kind, expert_to_rank=s.expert_to_rank,
                                        ep_size=s.ep_size, framework=s.framework, framework_version=s.framework_version,
                                        gate_class=type(s.module).__name__, bias=s.bias is not None)
                               for n, s, kind in zip(self.local_layers, self.specs, layer_count_kinds(self.specs, kept))],
                    "flush_every": flush_every, "record_eval": bool(record_eval), "kept": kept, "ranks": ranks,
                    "per_micro_batch": per_micro_batch and max_micro_batches, "replica_of": None}
        self.rank_layout: RankLayout = self._agree(declared, group, tp_group)
        descs = self.rank_layout.layers
        self.layers = self.rank_layout.names
        self.layer_count_kinds = [d["kind"] for d in descs]
        self.count_kind = trace_count_kind(self.layer_count_kinds)
        self.kept = self.count_kind != "routed"
        self.bias_layers = [d["name"] for d in descs if d.get("bias")]
        """Layers whose router has an expert bias (aux-loss-free routing): recorded per step, `Trace.router_bias()`."""
        self.layout = Layout.make(self.layers, [d["num_experts"] for d in descs], self.kept, record_eval,
                                  bias=bool(self.bias_layers))
        self._bias_fns = [(i, s.bias, s.num_experts) for i, s in enumerate(self.specs) if s.bias is not None]
        self._bias_errors: dict[str, str] = {}
        self._slot_of = {int(g): i for i, g in enumerate(self.rank_layout.local_slots(self.rank))}
        """{global layer index: this rank's buffer slot} for the layers it holds."""
        self.ranks_recorded = self.world_size > 1 if ranks == "auto" else bool(ranks)
        self.device = torch.device(device) if device is not None else self._default_device()
        self.manifest = self._manifest(model_name or type(model).__name__, tokens_per_step, extra or {})
        self.collectives = 0
        self.flushes = 0
        self._first_step = 0
        self._slot = 0
        self._buf: torch.Tensor | None = None
        self._gathered: torch.Tensor | None = None
        self._times = np.zeros(flush_every, dtype=np.float64)
        self._handles: dict[int, Any] = {}
        self._writer: BlockWriter | None = None
        self._hook_errors: dict[str, str] = {}
        self._warn_writer = False
        self._closed = False
        self._pg: Any = group
        self._warned_stall = False
        self._calls = [0] * len(self.specs)
        """[L] forwards of each gate seen by its hook since start() (host ints, any mode)."""
        self._calls_at_step = 0
        self._no_forward_steps: list[list[int]] = []
        self._no_forward_more = 0
        self._silent: dict[str, dict[str, Any]] = {}
        self._silent_checked = False
        self.dynamo_reset: dict[str, Any] | None = None
        """{"step", "modules"} where start() found compiled code for the model and reset dynamo."""
        self._gate_counts: dict[int, Callable] = {}  # each re-mapped layer's own counts function
        self._mb: torch.Tensor | None = None  # [F, M, L, W] routed rows of each micro-batch (per_micro_batch)
        self._mb_gathered: torch.Tensor | None = None
        self._mb_calls = [0] * len(self.specs)  # train forwards of each gate in the current step
        self._mb_used = 0  # micro-batches seen in the current block (the rows written)
        self._cache = KernelCache()
        self._host_tok: np.ndarray | None = None  # [F, P, L] tokens known on the host (shapes), added at the flush
        self._host_tok_mb: np.ndarray | None = None  # [F, M, L] the same for micro-batch rows
        self._nan_step = [-1] * len(self.specs)  # step of each gate's last NaN check
        self._staging: list[tuple[torch.Tensor, Any]] = []  # pinned host tokens in flight to the device
        self.micro_batches_stopped: dict[str, Any] | None = None
        """{"step", "reason"} where a step had more than max_micro_batches forwards of a gate: micro-batch
        rows stop there (step totals stay exact)."""
        self._map_changes_noted = 0
        self._thread: int | None = None  # the thread that stepped the tracer first: the only one that may step it

    # ---- setup ------------------------------------------------------------------------------------
    def _default_device(self) -> torch.device:
        for m in [s.module for s in self.specs] + [self.model]:
            for t in (*m.parameters(), *m.buffers()):
                return t.device
        return torch.device("cpu")

    def _agree(self, declared: dict[str, Any], group: Any, tp_group: Any) -> RankLayout:
        """The RankLayout of every rank's `declared` gates (a collective where world_size > 1). InputError
        where they cannot be reconciled (on every rank alike); where the collective itself fails, this
        rank's own layout, with tracing stopped (training goes on)."""
        if self.world_size == 1:
            return reconcile([declared])
        if tp_group is None:
            tp_group = _megatron_tp_group(self.specs)
        if tp_group is not None:
            declared["replica_of"] = _replica_of(tp_group, group, self.rank)
        self._cpu_pg = tracer_group(group, self.flush_timeout)
        try:
            every = all_gather_object(declared, self._cpu_pg, self.world_size)
        except Exception as e:  # a dead or late peer: record nothing rather than something wrong
            reason = f"layer agreement failed: {type(e).__name__}: {first_line(e, 160)}"
            self.tracing_stopped = {"step": 0, "reason": reason}
            self.errors.append(f"tracing stopped at step 0: {reason}")
            warnings.warn(f"moeload: tracing stopped on rank {self.rank} before the first step ({reason}); training "
                          "continues", RuntimeWarning, stacklevel=3)
            return reconcile([declared])
        return reconcile(every)

    def _manifest(self, model_name: str, tokens_per_step: int | None, extra: dict[str, Any]) -> Manifest:
        descs = self.rank_layout.layers
        ep = max(d["ep_size"] for d in descs)
        maps = None
        if any(d["expert_to_rank"] is not None for d in descs):
            maps = [list(d["expert_to_rank"]) if d["expert_to_rank"] is not None else _contiguous(d["num_experts"], ep)
                    for d in descs]
            ep = max(ep, 1 + max(max(m) for m in maps))
        frameworks = sorted({d["framework"] for d in descs})
        fv = sorted({f"{d['framework']} {d['framework_version']}" for d in descs if d["framework_version"]})
        lay = self.rank_layout
        if not lay.uniform:
            extra = {**extra, "layer_owners": lay.owners(),
                     **({"replica_ranks": {str(r): p for r, p in lay.replicas().items()}} if lay.replicas() else {})}
        return Manifest(
            layers=self.layers,
            experts_per_layer=[d["num_experts"] for d in descs],
            top_k=[d["top_k"] for d in descs],
            framework="+".join(frameworks),
            framework_version=", ".join(fv) or None,
            model_name=model_name,
            tokens_per_step=tokens_per_step,
            world_size=self.world_size,
            ep_size=ep,
            expert_to_rank=maps,
            count_kind=self.count_kind,
            ranks_recorded=self.ranks_recorded,
            flush_every=self.flush_every,
            extra={**extra, "record_eval": self.record_eval, "gate_classes": sorted({d["gate_class"] for d in descs}),
                   **({"layer_count_kinds": self.layer_count_kinds} if len(set(self.layer_count_kinds)) > 1 else {})},
        )

    def add_sink(self, fn: Callable[[FlushedBlock], None]) -> Callable[[FlushedBlock], None]:
        """Also call `fn(block)` on the writer thread after each block is written, as the `sink` argument
        is (every rank; blocks flushed before this call are not replayed). Returns `fn`."""
        if not callable(fn):
            raise InputError(f"add_sink: expected a callable taking a FlushedBlock, got {type(fn).__name__}")
        if self._closed:
            raise InputError("add_sink after close(): this tracer flushes no more blocks")
        self._sinks.append(fn)
        if self._writer is not None:
            self._writer.add_sink(fn)
        return fn

    def start(self) -> LoadTracer:
        """Allocate the device buffer, open the trace, install the hooks. Idempotent."""
        if self._buf is not None:
            return self
        if self._closed:
            raise InputError("LoadTracer: start() after close(); create a new tracer (same path appends)")
        if self.tracing_stopped is not None:  # the layer agreement failed: nothing is recorded on this rank
            return self
        L, P, W = self.rank_layout.width, self.layout.planes, self.layout.width
        self._buf = torch.zeros(self.flush_every, P, L, W, dtype=torch.int64, device=self.device)
        self._host_tok = np.zeros((self.flush_every, P, L), np.int64)
        if self.per_micro_batch:
            nbytes = self.flush_every * self.max_micro_batches * L * W * 8 * (1 + self.world_size * (self.world_size > 1))
            if nbytes > 1 << 30:
                self._buf = None
                raise InputError(f"per_micro_batch: flush_every={self.flush_every} x max_micro_batches="
                                 f"{self.max_micro_batches} x {L} layers x {W} columns needs {nbytes / 2**30:.1f} GiB of "
                                 "device buffers (limit 1 GiB); lower flush_every or max_micro_batches")
            self._mb = torch.zeros(self.flush_every, self.max_micro_batches, L, W, dtype=torch.int64, device=self.device)
            self._host_tok_mb = np.zeros((self.flush_every, self.max_micro_batches, L), np.int64)
        if self.world_size > 1:
            self._gathered = torch.empty((self.world_size, *self._buf.shape), dtype=torch.int64, device=self.device)
            if self._mb is not None:
                self._mb_gathered = torch.empty((self.world_size, *self._mb.shape), dtype=torch.int64, device=self.device)
            if self._buf.device.type == "cpu":
                self._pg = self._cpu_pg
        writer = None
        if self.path is not None and self.rank == 0:
            self._lock = trace_lock.TraceLock(self.path)  # one writer per trace directory
            try:
                self._lock.acquire()
                writer = TraceWriter(self.path, self.manifest, fsync=self.fsync)
            except BaseException as e:  # fail fast, before the first step: a configuration error, not a fault
                self._buf = self._gathered = None
                self._lock.release()
                if not isinstance(e, OSError):
                    raise
                raise InputError(f"{self.path}: cannot open the trace directory "
                                 f"({type(e).__name__}: {e.strerror or e}); choose a writable path") from None
            self.manifest = writer.manifest
        self._writer = BlockWriter(
            self.layout, writer=writer, sink=None, ranks_recorded=self.ranks_recorded,
            on_error=self._on_writer_error, notes=self._notes, max_pending=self.max_pending,
            closing=lambda: self._closed, top_k=[d["top_k"] for d in self.rank_layout.layers],
            exact=[k != "kept" for k in self.layer_count_kinds],
            rank_layout=None if self.rank_layout.uniform else self.rank_layout, event_timeout=self.flush_timeout,
            has_bias=[bool(d.get("bias")) for d in self.rank_layout.layers],
            bias_rank=[(o or [0])[0] for o in self.rank_layout.owners().values()],
        )
        for fn in self._sinks:
            self._writer.add_sink(fn)
        self._writer.preallocate(self._gathered if self._gathered is not None else self._buf)
        for li, spec in enumerate(self.specs):
            self._handles[li] = spec.module.register_forward_hook(self._make_hook(li, spec))
        self._reset_compiled()
        self._snap_bias()
        if self.world_size == 1:  # a forgotten close() still writes the last block at interpreter exit
            atexit.register(self.close)
        return self

    def _reset_compiled(self) -> None:
        """Dynamo does not call forward hooks added after it compiled a module's code (it does not
        guard on hooks, `torch._dynamo.config.skip_nnmodule_hook_guards`): where it already holds
        compiled code for the model or a module around a gate, reset it, so the next call recompiles
        with the hooks in. The reset is global (`torch.compiler.reset()`): every compiled function
        of this process recompiles at its next call."""
        found = compiled_modules(self.model, [s.module for s in self.specs])
        if not found:
            return
        try:
            torch.compiler.reset()
        except Exception as e:  # tracing never breaks training: the step checks still flag zero-forward steps
            warnings.warn(f"moeload: torch.compiler.reset() failed ({type(e).__name__}: {first_line(e, 160)}); hooks "
                          f"added after {found[0]!r} was compiled may not run", RuntimeWarning, stacklevel=3)
            return
        self.dynamo_reset = {"step": self.step_count, "modules": found[:8]}
        shown = ", ".join(repr(n) for n in found[:3]) + (", ..." if len(found) > 3 else "")
        warnings.warn(f"moeload: {shown} had been compiled and run before the tracer attached, so dynamo would not "
                      "call its hooks; called torch.compiler.reset() (every compiled function in this process "
                      "recompiles once at its next call). To avoid it, create the tracer before compiling",
                      RuntimeWarning, stacklevel=3)

    def _check_forwards(self) -> None:
        """At step(): note a step in which no gate's hook ran (a model or step function compiled
        before the tracer attached, which start() cannot see; warned once, `extra.no_forward_steps`)."""
        n = sum(self._calls)
        if n != self._calls_at_step:
            self._calls_at_step = n
            return
        step = self.step_count
        runs = self._no_forward_steps
        if runs and runs[-1][1] == step - 1:
            runs[-1][1] = step
            return
        if len(runs) == NO_FORWARD_CAP:  # the first ranges say what happened; the total stays exact
            self._no_forward_more += 1
            return
        runs.append([step, step])
        if len(runs) == 1:
            warnings.warn(f"moeload: step {step}: no forward of any of the {len(self.local_layers)} traced gates was seen, so "
                          "its counts are zero. If the model (or the training step) was compiled and run before the "
                          "tracer attached, dynamo does not call hooks added later: create the tracer before "
                          "compiling, or call torch.compiler.reset() after creating it (manifest "
                          "extra.no_forward_steps)", RuntimeWarning, stacklevel=3)

    def _check_silent(self) -> None:
        """At the first flush: gates whose hook never ran in the block (while steps passed) are listed in
        `extra.disabled_layers` with the reason, warned once."""
        if self._silent_checked or self._slot == 0:
            return
        self._silent_checked = True
        last = self.step_count - 1
        others = "no other gate ran either" if not any(self._calls) else "other gates ran"
        reason = (f"no forward seen in steps {self._first_step}..{last} ({others}; compiled before the tracer "
                  "attached? create the tracer before compiling or call torch.compiler.reset())")
        for li, n in enumerate(self._calls):
            if n == 0:
                self._silent[self.local_layers[li]] = {"step": self._first_step, "ranks": [self.rank], "reason": reason}
        if self._silent:
            names = list(self._silent)
            shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
            warnings.warn(f"moeload: {len(names)} of {len(self.local_layers)} traced gates ({shown}) {reason}; listed in the "
                          "manifest's extra.disabled_layers", RuntimeWarning, stacklevel=3)

    # ---- hot path ---------------------------------------------------------------------------------
    def _make_hook(self, li: int, spec: GateSpec) -> Callable:
        lay = self.layout
        calls, mb_calls, nan_step, cache = self._calls, self._mb_calls, self._nan_step, self._cache

        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            calls[li] += 1
            try:
                if module.training:
                    if in_backward():
                        return
                    pr, pk = lay.routed, lay.kept
                elif lay.eval_routed is not None:
                    pr, pk = lay.eval_routed, lay.eval_kept
                else:
                    return
                slot = self._slot
                assert self._buf is not None  # hooks exist between start() and close()
                rows = self._buf[slot]
                routed, tally, at = rows[pr, li], self._host_tok, (slot, pr, li)
                if self._mb is not None and pr == lay.routed:  # the m-th train forward of this gate: micro-batch m
                    m = mb_calls[li]
                    mb_calls[li] = m + 1
                    if m < self.max_micro_batches:
                        routed, tally, at = self._mb[slot, m, li], self._host_tok_mb, (slot, m, li)
                    else:
                        self._stop_micro()
                step = self._first_step + slot
                check = nan_step[li] != step  # NaN probabilities: checked at each gate's first forward of a step
                nan_step[li] = step
                r = spec.counts(module, inputs, output)
                tokens = accumulate(r, routed, None if pk is None else rows[pk, li], spec.num_experts, spec.top_k,
                                    cache=cache, nan=check)
                if tokens is not None:
                    assert tally is not None  # allocated with the rows it tallies for
                    tally[at] += tokens
            except Exception as e:
                code = DISABLED_SHAPE if isinstance(e, RoutingShapeError) else DISABLED_ERROR
                self._disable(li, f"{type(e).__name__}: {e}", code)

        return hook

    def _stop_micro(self) -> None:
        """A gate ran more than max_micro_batches times in one step: micro-batch rows stop from this step
        (its earlier micro-batches are still summed into the step), one warning, manifest note."""
        if self.micro_batches_stopped is None:
            step = self.step_count
            self.micro_batches_stopped = {
                "step": step, "reason": f"a gate ran more than max_micro_batches={self.max_micro_batches} forwards in step "
                                        f"{step}; step totals stay exact"}
            warnings.warn(f"moeload: micro-batch rows stop at step {step}: more than max_micro_batches="
                          f"{self.max_micro_batches} forwards of one gate in a step (raise it); step totals are exact",
                          RuntimeWarning, stacklevel=4)

    def _snap_bias(self) -> None:
        """Copy each router's expert bias into the current slot (the bias the coming step routes with:
        taken at start() and after each step(), i.e. after the optimizer step that updated it). One
        device copy per biased gate, no host sync; a bias that cannot be read stops being recorded for
        that layer (NaN from there, one warning, manifest extra.bias_errors)."""
        if not self._bias_fns or self._buf is None or self.tracing_stopped is not None:
            return
        row = self._buf[self._slot, self.layout.bias]
        for entry in list(self._bias_fns):
            li, fn, E = entry
            dst = row[li, 1 : E + 1].view(torch.float64)
            try:
                v = fn()
                if v is None:
                    dst.fill_(float("nan"))
                else:
                    dst.copy_(v.detach().reshape(E))
            except Exception as e:
                self._bias_fns.remove(entry)
                dst.fill_(float("nan"))
                name = self.local_layers[li]
                self._bias_errors[name] = f"step {self.step_count}: {type(e).__name__}: {first_line(e, 160)}"
                warnings.warn(f"moeload: the expert bias of layer {name!r} could not be read ({self._bias_errors[name]}); "
                              "it is not recorded from here on (counts are)", RuntimeWarning, stacklevel=3)

    def _disable(self, li: int, msg: str, code: int | None) -> None:
        """On the main thread: remove layer `li`'s hook, note why, warn once per layer. code: the FLAG_COL
        value written into this step's block (None for NaN: the writer thread found it in the block)."""
        handle = self._handles.pop(li, None)
        if handle is not None:
            handle.remove()
        name = self.local_layers[li]
        if name in self._hook_errors:
            return
        self._hook_errors[name] = msg
        self.errors.append(f"layer {name!r} at step {self.step_count}: {msg}")
        if code is not None and self._buf is not None:
            self._buf[self._slot, self.layout.routed, li, FLAG_COL].fill_(code)
        reason = NAN_REASON if code is None else REASONS[code]
        warnings.warn(f"moeload: tracing of layer {name!r} disabled ({reason}: {msg}); training continues",
                      RuntimeWarning, stacklevel=3)

    def step(self) -> None:
        """Close one optimizer step (all counted forwards since the previous call); flush every `flush_every`."""
        if self.tracing_stopped is not None and not self._closed:
            self._first_step += 1
            return
        if self._buf is None:
            raise InputError("LoadTracer.step() before start() (or after close()): use `with tracer:` or tracer.start() "
                             "before the first forward, so that step's forwards are counted")
        if self._thread is None:
            self._thread = threading.get_ident()
        elif threading.get_ident() != self._thread:
            raise InputError(f"LoadTracer.step() from thread {threading.current_thread().name!r}: a tracer is stepped by "
                             "one thread (the one that stepped it first: the training loop's); steps from several "
                             "threads would race on the step's slot")
        w = self._writer  # what the writer found in blocks before this step()'s flush: a fixed point to act
        assert w is not None  # start() made it after the buffer
        if (w.stalled is not None and not self._warned_stall) or not w.nan_layers.empty():
            self._poll_writer()
        self._check_forwards()
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
            warnings.warn(f"moeload: trace writing failed ({self.errors[-1]}); training continues, see tracer.errors",
                          RuntimeWarning, stacklevel=2)

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
        warnings.warn(f"moeload: tracing stopped on rank {self.rank} at step {first} ({reason}); later steps are not "
                      "recorded (manifest extra.tracing_stopped), earlier blocks stay; training continues",
                      RuntimeWarning, stacklevel=4)
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
            warnings.warn(f"moeload: a flushed block did not reach the host ({w.stalled}); its steps are listed in the "
                          "manifest's extra.lost_steps; tracing and training continue", RuntimeWarning, stacklevel=3)

    def record_rank_map(self, step: int, layer: int | str, expert_to_rank: Sequence[int], *,
                        phy2log: Sequence[int] | None = None) -> None:
        """Note that `layer`'s experts live on the ranks `expert_to_rank: [E]` from `step` on (the first
        step counted under the new map; call at a step boundary on every rank). The writer rank adds
        `{"step", "layer", "expert_to_rank"}` to the manifest's `rank_map_changes` at the next flush (or
        close); `Trace.gpu_loads()` then uses it. phy2log: [E] the logical expert behind each of the
        router's output columns, where a re-placement permuted the router's rows (moeload.act): counts
        are then reported per logical expert from the next forward on (None: the router's ids are
        logical ones). Raises InputError for a bad layer, step or map, or before `start()`."""
        if self._buf is None:
            raise InputError("record_rank_map before start() (or after close())")
        li = self.layers.index(layer) if isinstance(layer, str) and layer in self.layers else layer
        if isinstance(li, bool) or not isinstance(li, (int, np.integer)) or not 0 <= li < len(self.layers):
            raise InputError(f"record_rank_map: layer {layer!r} is not a traced layer (0..{len(self.layers) - 1} or a name)")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise InputError(f"record_rank_map: step must be an integer >= 0, got {step!r}")
        E, G = self.rank_layout.layers[li]["num_experts"], self.manifest.ep_size
        maps = {"expert_to_rank": expert_to_rank, "phy2log": phy2log}
        for name, m in maps.items():
            if m is None:
                continue
            a = np.asarray(m)
            if a.shape != (E,) or a.dtype.kind not in "iu":
                raise InputError(f"record_rank_map: {name} must be {E} integers, got {m!r}")
            if name == "expert_to_rank" and not ((a >= 0) & (a < G)).all():
                raise InputError(f"record_rank_map: expert_to_rank holds ranks outside [0, ep_size={G}): {a.tolist()}")
            if name == "phy2log" and sorted(a.tolist()) != list(range(E)):
                raise InputError(f"record_rank_map: phy2log must be a permutation of 0..{E - 1}, got {a.tolist()}")
        slot = self._slot_of.get(int(li))
        if slot is not None:  # a gate this rank holds: count logical experts from the next forward on
            spec = self.specs[slot]
            own = self._gate_counts.setdefault(slot, spec.counts)
            p2l = list(range(E)) if phy2log is None else [int(x) for x in phy2log]
            spec.counts = own if p2l == list(range(E)) else _logical_counts(own, p2l, self.device)
        self.manifest.rank_map_changes.append(
            {"step": int(step), "layer": int(li), "expert_to_rank": [int(r) for r in expert_to_rank]})

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

    # ---- lifecycle --------------------------------------------------------------------------------
    def close(self, *, collective: bool = True) -> None:
        """Flush the partial last block, wait for the writer thread, remove the hooks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for h in self._handles.values():
            h.remove()
        self._handles.clear()
        if self._writer is not None:
            if self.tracing_stopped is None:
                self._check_silent()
            self._flush(collective)
            self._writer.close()
            if self._writer.stalled is not None or not self._writer.nan_layers.empty():
                self._poll_writer()
                self._writer.update_manifest()
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
        self._buf = self._gathered = self._mb = self._mb_gathered = None
        if self._warn_writer:
            self._warn_writer = False
            warnings.warn(f"moeload: trace writing failed ({self.errors[-1]}); see tracer.errors", RuntimeWarning, stacklevel=2)

    def __enter__(self) -> LoadTracer:
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(collective=exc_type is None or self.world_size == 1)

    # ---- progress and resume ----------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Steps closed so far (the number the next step will get)."""
        return self._first_step + self._slot

    @property
    def last_flushed_step(self) -> int | None:
        """Last step whose block the writer thread has written (None before the first)."""
        return None if self._writer is None else self._writer.last_flushed_step

    @property
    def dropped_blocks(self) -> int:
        """Blocks this run dropped because `max_pending` blocks were still waiting for the writer."""
        return 0 if self._writer is None else self._writer.dropped_blocks

    @property
    def disabled_layers(self) -> list[str]:
        return list(self._hook_errors)

    def state_dict(self) -> dict[str, Any]:
        """{"step": step_count, "layers": [...]}: restore with `load_state_dict` to append on resume."""
        return {"step": self.step_count, "layers": list(self.layers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue step numbering from `state["step"]`; call before the first `step()` of this run."""
        if self._slot != 0 or self.flushes:
            raise InputError(f"load_state_dict: {self.step_count} steps already recorded in this run; call it before the first step()")
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
            raise InputError(f"load_state_dict: expected {{'step': int >= 0, ...}}, got {state!r}")
        if "layers" in state and list(state["layers"]) != self.layers:
            raise InputError(f"load_state_dict: saved layers {state['layers']} differ from this model's {self.layers}")
        self._first_step = state["step"]

    def callback(self) -> StepCallback:
        """A thin callback (`on_step_end()`, also callable as `train(on_step=...)`) bound to this tracer."""
        return StepCallback(self)

    def __repr__(self) -> str:
        return (f"LoadTracer({self.path!r}, layers={len(self.layers)}, step={self.step_count}, "
                f"last_flushed={self.last_flushed_step}, world={self.world_size})")


def plain_name(path: str) -> str:
    """A module path without the `_orig_mod` segments that `torch.compile` wrappers add, so a layer has the
    same name in eager and compiled models (whole-model or per-block compile)."""
    return ".".join(p for p in path.split(".") if p != "_orig_mod")


def compiled_modules(model: nn.Module, gates: Sequence[nn.Module]) -> list[str]:
    """Paths (plain names, "<model>" for `model` itself) of the modules on the way from `model` to each gate, the gates
    included, whose forward code dynamo holds compiled code for (it ran compiled: `torch.compile(m)`,
    `m.compile()`, per-block compile), or, where that cannot be read, that are compiled wrappers."""
    if "torch._dynamo" not in sys.modules:  # nothing was compiled in this process
        return []
    paths = {id(m): p for p, m in model.named_modules()}
    on_path: set[str] = set()
    for g in gates:
        if id(g) in paths:
            parts = paths[id(g)].split(".") if paths[id(g)] else []
            on_path.update(".".join(parts[:i]) for i in range(len(parts) + 1))
    found = []
    for p, m in model.named_modules():
        name = plain_name(p) or "<model>"
        if p in on_path and name not in found and _ran_compiled(m):
            found.append(name)
    return found


def _ran_compiled(m: nn.Module) -> bool:
    wrapper = isinstance(m, torch._dynamo.eval_frame.OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
    code = getattr(getattr(type(m), "forward", None), "__code__", None)
    if _cache_entries is None or code is None:
        return wrapper
    try:
        return len(_cache_entries(code)) > 0
    except Exception:  # a private API that changed: fall back to what can be seen
        return wrapper


class StepCallback:
    """For hand-written loops: `on_step_end()` after each optimizer step; `on_train_end()` closes."""

    def __init__(self, tracer: LoadTracer) -> None:
        self.tracer = tracer

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        """Start the tracer (also done by the first step)."""
        self.tracer.start()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        """Close one optimizer step."""
        self.tracer.step()

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        """Flush and close the tracer."""
        self.tracer.close()

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.tracer.step()

    def state_dict(self) -> dict[str, Any]:
        return self.tracer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracer.load_state_dict(state)


def layer_count_kinds(specs: Sequence[GateSpec], kept: bool | str = True) -> list[str]:
    """[L] what the trace holds for each gate: "kept" (its routing is taken after capacity dropping,
    `GateSpec.count_kind == "kept"`; whatever `kept` says, since that is all it shows), "both" (routed
    and kept: the gate reports drops and kept=True, or kept="always") or "routed"."""
    out = []
    for s in specs:
        kind = s.count_kind or "routed"
        if kind not in ("routed", "kept"):
            raise ValueError(f"GateSpec {s.name!r}: count_kind={kind!r}, expected None, 'routed' or 'kept'")
        if kind == "routed" and (kept == "always" or (bool(kept) and s.has_kept)):
            kind = "both"
        out.append(kind)
    return out


def trace_count_kind(kinds: Sequence[str]) -> str:
    """The manifest's `count_kind` for per-layer kinds: the common kind, or "both" where layers differ."""
    return kinds[0] if len(set(kinds)) == 1 else "both"


def _logical_counts(counts: Callable, phy2log: list[int], device: torch.device) -> Callable:
    """A gate's counts function whose router column p now holds logical expert phy2log[p] -> one that
    reports logical experts (device-side indexing only, no host sync)."""
    E = len(phy2log)
    p2l = torch.tensor(phy2log, dtype=torch.int64, device=device)
    l2p = torch.argsort(p2l)

    def logical(module: nn.Module, inputs: tuple, output: Any) -> Any:
        r = as_routing(counts(module, inputs, output))
        idx = r.indices
        if idx is not None:
            ok = (idx >= 0) & (idx < E)
            idx = torch.where(ok, p2l.to(idx.device)[idx.clamp(0, E - 1).long()].to(idx.dtype), idx)
        cols = {k: getattr(r, k)[..., l2p.to(getattr(r, k).device)] for k in ("mask", "kept_mask", "counts", "kept_counts")
                if getattr(r, k) is not None}
        return r._replace(indices=idx, **cols)

    return logical


def _contiguous(num_experts: int, ep_size: int) -> list[int]:
    """The contiguous expert -> rank map (its one home: moeload.trace.layout)."""
    return contiguous_expert_to_rank(num_experts, ep_size)


def _replica_of(tp_group: Any, group: Any, rank: int) -> int | None:
    """This rank's primary in `group` numbering: the first rank of `tp_group` (None where that is this rank)."""
    dist = torch.distributed
    first = dist.get_process_group_ranks(tp_group)[0]
    p = first if group is None else dist.get_group_rank(group, first)
    return None if p == rank else int(p)


def _megatron_tp_group(specs: Sequence[GateSpec]) -> Any:
    """megatron-core's tensor-parallel group where its routers are replicated (TP > 1 without sequence
    parallel: every TP rank routes the same tokens), else None."""
    cfgs = [getattr(s.module, "config", None) for s in specs if s.framework == "megatron-core"]
    if not cfgs or any(getattr(c, "sequence_parallel", False) for c in cfgs):
        return None
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
            return ps.get_tensor_model_parallel_group()
    except Exception:  # not initialised the usual way: the caller can pass tp_group=
        return None
    return None
