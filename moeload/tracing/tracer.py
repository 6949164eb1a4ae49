"""LoadTracer: per-step expert counts of every MoE gate, accumulated on the device, written in blocks."""

from __future__ import annotations

import atexit
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from moeload.errors import InputError, NoGatingModulesError
from moeload.trace import TraceWriter
from moeload.trace import lock as trace_lock
from moeload.tracing.accumulate import KernelCache
from moeload.tracing.adapters import Adapter, GateSpec, GenericAdapter, discover, registered_adapters
from moeload.tracing.adapters.base import find_bias
from moeload.tracing.agreement import (  # noqa: F401  (re-exported: defined here before the split)
    LayerAgreement,
    _contiguous,
    _megatron_tp_group,
    _replica_of,
    layer_count_kinds,
    trace_count_kind,
)
from moeload.tracing.block import FlushedBlock, Layout
from moeload.tracing.compiled import (  # noqa: F401
    NO_FORWARD_CAP,
    _cache_entries,
    _ran_compiled,
    compiled_modules,
    plain_name,
)
from moeload.tracing.flush import BlockWriter
from moeload.tracing.hooks import _graph_task_id, _logical_counts, in_backward  # noqa: F401
from moeload.tracing.options import MAX_FLUSH_EVERY, check_options  # noqa: F401  (MAX_FLUSH_EVERY: re-exported)
from moeload.tracing.ranks import RankLayout, describe
from moeload.tracing.step_callback import StepCallback
from moeload.tracing.stepping import StepFlush


class LoadTracer(StepFlush, LayerAgreement):
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
    hooks_in_graph: under ``torch.compile``, trace the hooks into the graph (no graph break at the
    gates, for ``fullgraph=True`` and CUDA graphs; counts go to device rows folded in at ``step()``)
    instead of the default, where dynamo breaks the graph at each gate's hook and runs it eagerly
    (exact in every compile layout). With True, a compiled module run inside
    ``torch.utils.checkpoint`` (checkpoint around compiled code; compiling the checkpointed block,
    as torchtitan does, is fine) counts its recomputation again: the hook cannot see the backward
    pass from inside a graph.
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
        hooks_in_graph: bool = False,
    ) -> None:
        check_options(
            flush_every=flush_every,
            kept=kept,
            ranks=ranks,
            gate_output=gate_output,
            path=path,
            sink=sink,
            per_micro_batch=per_micro_batch,
            max_micro_batches=max_micro_batches,
            hooks_in_graph=hooks_in_graph,
            max_pending=max_pending,
            flush_timeout=flush_timeout,
        )
        self.per_micro_batch, self.max_micro_batches = per_micro_batch, max_micro_batches
        self.hooks_in_graph = hooks_in_graph
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
            tried.insert(
                0,
                GenericAdapter(
                    gates or (),
                    gate_types or (),
                    num_experts=num_experts,
                    top_k=top_k,
                    has_kept=kept == "always",
                    gate_output=gate_output,
                ),
            )
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
        declared = {
            "layers": [
                describe(
                    n,
                    s.num_experts,
                    s.top_k,
                    kind,
                    expert_to_rank=s.expert_to_rank,
                    ep_size=s.ep_size,
                    framework=s.framework,
                    framework_version=s.framework_version,
                    gate_class=type(s.module).__name__,
                    bias=s.bias is not None,
                )
                for n, s, kind in zip(self.local_layers, self.specs, layer_count_kinds(self.specs, kept))
            ],
            "flush_every": flush_every,
            "record_eval": bool(record_eval),
            "kept": kept,
            "ranks": ranks,
            "per_micro_batch": per_micro_batch and max_micro_batches,
            "replica_of": None,
        }
        self.rank_layout: RankLayout = self._agree(declared, group, tp_group)
        descs = self.rank_layout.layers
        self.layers = self.rank_layout.names
        self.layer_count_kinds = [d["kind"] for d in descs]
        self.count_kind = trace_count_kind(self.layer_count_kinds)
        self.kept = self.count_kind != "routed"
        self.bias_layers = [d["name"] for d in descs if d.get("bias")]
        """Layers whose router has an expert bias (aux-loss-free routing): recorded per step, `Trace.router_bias()`."""
        self.layout = Layout.make(
            self.layers, [d["num_experts"] for d in descs], self.kept, record_eval, bias=bool(self.bias_layers)
        )
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
        self._live: torch.Tensor | None = None  # [P, L, W] the open step's rows written by compiled hooks
        self._nan_sums: torch.Tensor | None = None  # [P, L] float64: each gate's probability sum at its NaN check
        self._compiled_layers: set[int] = set()  # layers whose hook runs inside a compiled graph
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
        self._nan_sums = torch.zeros(P, L, dtype=torch.float64, device=self.device)
        if self.hooks_in_graph:
            self._live = torch.zeros(P, L, W, dtype=torch.int64, device=self.device)
        self._host_tok = np.zeros((self.flush_every, P, L), np.int64)
        if self.per_micro_batch:
            nbytes = (
                self.flush_every * self.max_micro_batches * L * W * 8 * (1 + self.world_size * (self.world_size > 1))
            )
            if nbytes > 1 << 30:
                self._buf = None
                raise InputError(
                    f"per_micro_batch: flush_every={self.flush_every} x max_micro_batches="
                    f"{self.max_micro_batches} x {L} layers x {W} columns needs {nbytes / 2**30:.1f} GiB of "
                    "device buffers (limit 1 GiB); lower flush_every or max_micro_batches"
                )
            self._mb = torch.zeros(
                self.flush_every, self.max_micro_batches, L, W, dtype=torch.int64, device=self.device
            )
            self._host_tok_mb = np.zeros((self.flush_every, self.max_micro_batches, L), np.int64)
        if self.world_size > 1:
            self._gathered = torch.empty((self.world_size, *self._buf.shape), dtype=torch.int64, device=self.device)
            if self._mb is not None:
                self._mb_gathered = torch.empty(
                    (self.world_size, *self._mb.shape), dtype=torch.int64, device=self.device
                )
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
                raise InputError(
                    f"{self.path}: cannot open the trace directory "
                    f"({type(e).__name__}: {e.strerror or e}); choose a writable path"
                ) from None
            self.manifest = writer.manifest
        self._writer = BlockWriter(
            self.layout,
            writer=writer,
            sink=None,
            ranks_recorded=self.ranks_recorded,
            on_error=self._on_writer_error,
            notes=self._notes,
            max_pending=self.max_pending,
            closing=lambda: self._closed,
            top_k=[d["top_k"] for d in self.rank_layout.layers],
            exact=[k != "kept" for k in self.layer_count_kinds],
            rank_layout=None if self.rank_layout.uniform else self.rank_layout,
            event_timeout=self.flush_timeout,
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
            warnings.warn(
                f"moeload: trace writing failed ({self.errors[-1]}); see tracer.errors", RuntimeWarning, stacklevel=2
            )

    def __enter__(self) -> LoadTracer:
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(collective=exc_type is None or self.world_size == 1)

    # ---- progress and resume ----------------------------------------------------------------------
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
            raise InputError(
                f"load_state_dict: {self.step_count} steps already recorded in this run; call it before the first step()"
            )
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
            raise InputError(f"load_state_dict: expected {{'step': int >= 0, ...}}, got {state!r}")
        if "layers" in state and list(state["layers"]) != self.layers:
            raise InputError(f"load_state_dict: saved layers {state['layers']} differ from this model's {self.layers}")
        self._first_step = state["step"]

    def callback(self) -> StepCallback:
        """A thin callback (`on_step_end()`, also callable as `train(on_step=...)`) bound to this tracer."""
        return StepCallback(self)

    def __repr__(self) -> str:
        return (
            f"LoadTracer({self.path!r}, layers={len(self.layers)}, step={self.step_count}, "
            f"last_flushed={self.last_flushed_step}, world={self.world_size})"
        )
