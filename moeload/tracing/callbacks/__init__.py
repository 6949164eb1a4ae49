"""Training-framework callbacks over LoadTracer, each imported only when asked for.

- `moeload.tracing.callbacks.hf.MoeLoadCallback`: Hugging Face `Trainer`
- `moeload.tracing.callbacks.lightning.MoeLoadCallback`: Lightning `Trainer`
- `moeload.tracing.callbacks.deepspeed.trace_engine(engine, path)`: DeepSpeed engine
- `moeload.tracing.callbacks.metrics`: per-layer load metrics -> TensorBoard / W&B

Here: `HFCallback`, `LightningCallback`, `trace_engine`, `EngineTracing`, `MetricLogger`,
`load_metrics`, `TracingSession` (the shared part) resolve lazily. The online planner, which uses
the analysis packages, is `moeload.online.OnlinePlanner` (above them, beside the re-placement it feeds).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "HFCallback": ("moeload.tracing.callbacks.hf", "MoeLoadCallback"),
    "LightningCallback": ("moeload.tracing.callbacks.lightning", "MoeLoadCallback"),
    "trace_engine": ("moeload.tracing.callbacks.deepspeed", "trace_engine"),
    "EngineTracing": ("moeload.tracing.callbacks.deepspeed", "EngineTracing"),
    "MetricLogger": ("moeload.tracing.callbacks.metrics", "MetricLogger"),
    "load_metrics": ("moeload.tracing.callbacks.metrics", "load_metrics"),
    "TracingSession": ("moeload.tracing.callbacks._base", "TracingSession"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
