"""moeload: record, understand, forecast and balance MoE expert load."""

from __future__ import annotations

from moeload._version import __version__ as __version__
from moeload.errors import MoeloadError, NotFittedError, TraceFormatError  # noqa: E402
from moeload.trace import Trace, open_trace  # noqa: E402


def __getattr__(name: str):
    # Lazy: importing moeload must not import torch (DESIGN.md, dependencies point down).
    if name == "LoadTracer":
        from moeload.tracing import LoadTracer

        return LoadTracer
    if name in {"states", "predictors", "evaluation", "placement", "plots", "workloads"}:
        import importlib

        return importlib.import_module(f"moeload.{name}")
    raise AttributeError(f"module 'moeload' has no attribute {name!r}")


__all__ = [
    "LoadTracer",
    "MoeloadError",
    "NotFittedError",
    "Trace",
    "TraceFormatError",
    "open_trace",
    "states",
    "predictors",
    "evaluation",
    "placement",
]
