"""Recording expert load during training: LoadTracer (tracer.py) and gate adapters (adapters/)."""

from moeload.tracing.adapters import (
    Adapter,
    GateSpec,
    GenericAdapter,
    Routing,
    RoutingShapeError,
    discover,
    register_adapter,
)
from moeload.tracing.block import FlushedBlock
from moeload.tracing.tracer import LoadTracer, StepCallback

__all__ = [
    "Adapter",
    "FlushedBlock",
    "GateSpec",
    "GenericAdapter",
    "LoadTracer",
    "Routing",
    "RoutingShapeError",
    "StepCallback",
    "discover",
    "register_adapter",
]
