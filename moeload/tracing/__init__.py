"""Recording expert load during training: LoadTracer (tracer.py) and gate adapters (adapters/)."""

from moeload.tracing.adapters import Adapter, GateSpec, Routing, discover, register_adapter

__all__ = ["Adapter", "GateSpec", "Routing", "discover", "register_adapter"]
