"""Hugging Face `Trainer` callback: `Trainer(..., callbacks=[MoeLoadCallback("runs/x.moeload")])`.

Trace steps are the Trainer's optimizer steps (`state.global_step - 1`), so gradient accumulation
sums micro-batches into one step and a resumed run continues its numbering. Metrics go to
TensorBoard (`tensorboard=` a directory; `True`: `<logging_dir or output_dir>/moeload-tb`) and W&B.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from moeload.tracing.callbacks._base import TracingSession


class MoeLoadCallback(TrainerCallback):
    """Thin HF callback over a `TracingSession`; tracer options as keyword arguments."""

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        tensorboard: str | os.PathLike | bool | Any | None = None,
        wandb: bool | None = None,
        **tracer_kwargs: Any,
    ) -> None:
        self._tb_from_args = tensorboard is True
        self.session = TracingSession(
            path, tensorboard=None if tensorboard is True else tensorboard, wandb=wandb, **tracer_kwargs
        )

    @property
    def tracer(self):
        return self.session.tracer

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Build the tracer on the model being trained (the unwrapped module)."""
        if self.session.path is None and self.session._user_sink is None:
            self.session.path = os.path.join(args.output_dir, "moeload")
        if self._tb_from_args:
            logdir = getattr(args, "logging_dir", None) or args.output_dir  # 5.x has no logging_dir
            self.session.tensorboard = os.path.join(logdir, "moeload-tb")
        self.session.open(model)

    def on_step_end(self, args, state, control, **kwargs):
        """An optimizer step ended: close one trace step."""
        self.session.step(state.global_step - 1)

    def on_train_end(self, args, state, control, **kwargs):
        """Flush and close."""
        self.session.close()

    def state_dict(self) -> dict[str, Any]:
        return self.session.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.session.load_state_dict(state)


__all__ = ["MoeLoadCallback"]
