"""The state every part of LoadTracer shares: its attributes, declared here for the type checker (set by
`LoadTracer.__init__`), and `step_count`. LoadTracer is assembled from one class per concept: `hooks`
(the hot path), `compiled` (torch.compile), `stepping` (step() and its flush), `agreement` (layers
across ranks) and `tracer` (construction and lifecycle); `step_callback` binds a callback to one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from moeload.trace import Manifest
from moeload.tracing.accumulate import KernelCache
from moeload.tracing.adapters import GateSpec
from moeload.tracing.block import Layout
from moeload.tracing.flush import BlockWriter
from moeload.tracing.ranks import RankLayout


class TracerState:
    """LoadTracer's attributes (see `LoadTracer.__init__` for what each holds)."""

    model: nn.Module
    specs: list[GateSpec]
    local_layers: list[str]
    layers: list[str]
    layer_count_kinds: list[str]
    count_kind: str
    bias_layers: list[str]
    layout: Layout
    rank_layout: RankLayout
    manifest: Manifest
    device: torch.device
    world_size: int
    rank: int
    ranks_recorded: bool
    flush_every: int
    flush_timeout: float | None
    record_eval: bool
    per_micro_batch: bool
    max_micro_batches: int
    errors: list[str]
    tracing_stopped: dict[str, Any] | None
    micro_batches_stopped: dict[str, Any] | None
    dynamo_reset: dict[str, Any] | None
    collectives: int
    flushes: int
    _first_step: int
    _slot: int
    _buf: torch.Tensor | None
    _gathered: torch.Tensor | None
    _mb: torch.Tensor | None
    _mb_gathered: torch.Tensor | None
    _mb_calls: list[int]
    _mb_used: int
    _host_tok: np.ndarray | None
    _live: torch.Tensor | None
    _nan_sums: torch.Tensor | None
    hooks_in_graph: bool
    _compiled_layers: set[int]
    _host_tok_mb: np.ndarray | None
    _staging: list[tuple[torch.Tensor, Any]]
    _times: np.ndarray
    _cache: KernelCache
    _calls: list[int]
    _calls_at_step: int
    _nan_step: list[int]
    _handles: dict[int, Any]
    _hook_errors: dict[str, str]
    _bias_fns: list[tuple[int, Callable[[], torch.Tensor | None], int]]
    _bias_errors: dict[str, str]
    _gate_counts: dict[int, Callable]
    _slot_of: dict[int, int]
    _no_forward_steps: list[list[int]]
    _no_forward_more: int
    _silent: dict[str, dict[str, Any]]
    _silent_checked: bool
    _writer: BlockWriter | None
    _warn_writer: bool
    _warned_stall: bool
    _closed: bool
    _pg: Any
    _cpu_pg: Any
    _map_changes_noted: int
    _thread: int | None

    @property
    def step_count(self) -> int:
        """Steps closed so far (the number the next step will get)."""
        return self._first_step + self._slot
