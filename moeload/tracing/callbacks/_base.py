"""What every training-framework callback shares: build the tracer, number steps by the framework's
own optimizer-step counter, log metrics at each flush, flush on exceptions and at exit."""

from __future__ import annotations

import atexit
import os
import sys
import weakref
from typing import Any

from torch import nn

from moeload.tracing.block import FlushedBlock
from moeload.tracing.callbacks.metrics import MetricLogger
from moeload.tracing.tracer import LoadTracer


class TracingSession:
    """One LoadTracer driven by a training framework.

    path: trace directory; tensorboard: log directory or SummaryWriter for load metrics; wandb:
    log them to the active W&B run (None: when one is active); tracer_kwargs: passed to
    `LoadTracer` (flush_every, record_eval, gates, ...; a `sink` there is called too).
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        *,
        tensorboard: str | os.PathLike | Any | None = None,
        wandb: bool | None = None,
        **tracer_kwargs: Any,
    ) -> None:
        self.path = path
        self.tracer_kwargs = tracer_kwargs
        self.tensorboard = tensorboard
        self.wandb = wandb
        self.tracer: LoadTracer | None = None
        self.metrics: MetricLogger | None = None
        self._pending: dict[str, Any] | None = None
        self._aligned = False
        self._user_sink = tracer_kwargs.pop("sink", None)

    # ---- lifecycle --------------------------------------------------------------------------------
    def open(self, model: nn.Module) -> LoadTracer:
        """Build and start the tracer on `model` (once); later calls return the same tracer."""
        if self.tracer is not None:
            return self.tracer
        if self.tensorboard is not None or self.wandb or (self.wandb is None and "wandb" in sys.modules):
            self.metrics = MetricLogger(self.tensorboard, wandb=self.wandb)
        self.tracer = LoadTracer(model, self.path, sink=self._sink, **self.tracer_kwargs)
        if self.metrics is not None:
            m = self.tracer.manifest
            self.metrics.configure(self.tracer.layers, list(m.experts_per_layer), m.expert_to_rank)
        if self._pending is not None:
            self.tracer.load_state_dict(self._pending)
            self._aligned = True
        self.tracer.start()
        ref = weakref.ref(self)
        atexit.register(_close_at_exit, ref)
        return self.tracer

    def _sink(self, block: FlushedBlock) -> None:
        if self.metrics is not None:
            self.metrics(block)
        if self._user_sink is not None:
            self._user_sink(block)

    def step(self, index: int | None = None) -> None:
        """One optimizer step was taken; `index`: its 0-based number in the framework's own counter.

        The first call numbers the trace from `index` (a resumed run continues its steps); later
        calls just close one step each.
        """
        if self.tracer is None:
            return
        if not self._aligned:
            self._aligned = True
            if index is not None and index > 0 and self.tracer.step_count == 0:
                self.tracer.load_state_dict({"step": int(index)})
        self.tracer.step()

    def close(self, *, collective: bool = True) -> None:
        """Flush what is recorded and close the tracer (idempotent). collective=False after a failure."""
        if self.tracer is not None:
            self.tracer.close(collective=collective)
        if self.metrics is not None:
            self.metrics.close()

    # ---- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """{"step": next step number, "layers": [...]} (empty before the tracer exists)."""
        if self.tracer is None:
            return dict(self._pending or {})
        return self.tracer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue numbering from a saved `state_dict` (applied when the tracer is built)."""
        if not state:
            return
        if self.tracer is not None and self.tracer.step_count == 0:
            self.tracer.load_state_dict(state)
            self._aligned = True
        else:
            self._pending = dict(state)


def _close_at_exit(ref: weakref.ref) -> None:
    """Interpreter exit (e.g. after an uncaught exception): write the partial block, no collective."""
    s = ref()
    if s is not None and s.tracer is not None:
        s.close(collective=False)


def is_rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


__all__ = ["TracingSession", "is_rank_zero"]
