"""StepCallback: a thin callback bound to one LoadTracer, for hand-written training loops."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moeload.tracing.tracer import LoadTracer


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
