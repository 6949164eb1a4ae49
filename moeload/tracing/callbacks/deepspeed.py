"""DeepSpeed engine helper: `tracing = trace_engine(engine, "runs/x.moeload")`, then train as usual.

It wraps `engine.step` on this engine instance: a call taken at a gradient-accumulation boundary
(`engine.is_gradient_accumulation_boundary()` before the step, the same test the engine makes) is
one optimizer step and closes one trace step; micro-steps in between are summed into it. Trace
steps are numbered by `engine.global_steps`, so a run resumed with `engine.load_checkpoint`
continues its numbering. An exception from `engine.step` flushes what was recorded and re-raises.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from moeload.tracing.callbacks._base import TracingSession


class EngineTracing:
    """Traces the MoE gates of `engine.module`; `close()` (or leaving the `with` block) restores `engine.step`."""

    def __init__(
        self,
        engine: Any,
        path: str | os.PathLike | None,
        *,
        tensorboard: str | os.PathLike | Any | None = None,
        wandb: bool | None = None,
        **tracer_kwargs: Any,
    ) -> None:
        self.engine = engine
        self.session = TracingSession(path, tensorboard=tensorboard, wandb=wandb, **tracer_kwargs)
        self.session.open(engine.module)
        self._orig_step = engine.step
        engine.step = self._wrap(engine.step)

    @property
    def tracer(self):
        return self.session.tracer

    def _wrap(self, step):
        @functools.wraps(step)
        def traced_step(*args: Any, **kwargs: Any) -> Any:
            boundary = self.engine.is_gradient_accumulation_boundary()
            index = self.engine.global_steps
            try:
                out = step(*args, **kwargs)
            except BaseException:
                self.close(collective=False)
                raise
            if boundary:
                self.session.step(index)
            return out

        return traced_step

    def close(self, *, collective: bool = True) -> None:
        """Flush, close the tracer and put `engine.step` back (idempotent)."""
        if self._orig_step is not None:
            self.engine.__dict__.pop("step", None)  # the class's own step again
            self._orig_step = None
        self.session.close(collective=collective)

    def state_dict(self) -> dict[str, Any]:
        """For `engine.save_checkpoint(..., client_state={"moeload": tracing.state_dict()})`."""
        return self.session.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.session.load_state_dict(state)

    def __enter__(self) -> EngineTracing:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(collective=exc_type is None)


def trace_engine(engine: Any, path: str | os.PathLike | None, **kwargs: Any) -> EngineTracing:
    """`EngineTracing(engine, path, **kwargs)`: start tracing a DeepSpeed engine's MoE gates."""
    return EngineTracing(engine, path, **kwargs)


__all__ = ["EngineTracing", "trace_engine"]
