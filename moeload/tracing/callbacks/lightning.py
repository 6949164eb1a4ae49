"""Lightning callback: `L.Trainer(callbacks=[MoeLoadCallback("runs/x.moeload")])`.

Trace steps are optimizer steps (`trainer.global_step`), so `accumulate_grad_batches` sums the
micro-batches of one step; the step number is saved in checkpoints (`state_dict`) and a resumed
fit continues it. `on_exception` writes what was recorded. Works with `lightning.pytorch` and the
older `pytorch_lightning` package.
"""

from __future__ import annotations

import os
from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - the standalone package
    from pytorch_lightning import Callback  # type: ignore[assignment]  # the same class in the older package

from moeload.tracing.callbacks._base import TracingSession


class MoeLoadCallback(Callback):
    """Thin Lightning callback over a `TracingSession`; tracer options as keyword arguments."""

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        tensorboard: str | os.PathLike | Any | None = None,
        wandb: bool | None = None,
        **tracer_kwargs: Any,
    ) -> None:
        self.session = TracingSession(path, tensorboard=tensorboard, wandb=wandb, **tracer_kwargs)
        self._seen = 0

    @property
    def tracer(self):
        return self.session.tracer

    def on_fit_start(self, trainer, pl_module):
        """Build the tracer on the LightningModule."""
        if self.session.path is None and self.session._user_sink is None:
            self.session.path = os.path.join(trainer.default_root_dir, "moeload")
        self.session.open(pl_module)

    def on_train_start(self, trainer, pl_module):
        """Start counting from the (possibly restored) global step."""
        self._seen = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        """Close one trace step for each optimizer step taken since the last batch."""
        while self._seen < trainer.global_step:
            self.session.step(self._seen)
            self._seen += 1

    def on_fit_end(self, trainer, pl_module):
        """Flush and close."""
        self.session.close()

    def on_exception(self, trainer, pl_module, exception):
        """Write what was recorded (no collective: other ranks may be gone)."""
        self.session.close(collective=False)

    def state_dict(self) -> dict[str, Any]:
        return self.session.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.session.load_state_dict(state_dict)


__all__ = ["MoeLoadCallback"]
