"""Adapter for the embedded workload's `moeload.workloads.TopKRouter` (routed and kept counts)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from moeload.tracing.adapters.base import Adapter, GateSpec, Routing

if TYPE_CHECKING:
    from torch import nn


def _routing(module: nn.Module, inputs: tuple, out) -> Routing:
    """RouterOutput(indices [T, k], kept [T, k], probs [T, E], ...) -> Routing; kept only where capacity drops."""
    return Routing(indices=out.indices, kept=out.kept if module.capacity_factor is not None else None, probs=out.probs)


def _routing_capacity(module: nn.Module, inputs: tuple, out) -> Routing:
    """A `TopKRouter` / `BiasRouter` (the classes themselves) with a capacity factor: its own per-expert
    `counts` and the capacity C it kept by. Its queue positions are distinct per expert (`slot_positions`)
    and it keeps those < C, so kept = min(counts, C) exactly (`Routing.capacity`: both rows in two kernels).
    An output without counts (an older or re-built RouterOutput) is read from its indices and kept mask."""
    counts = getattr(out, "counts", None)
    if counts is None or module.capacity_factor is None:
        return _routing(module, inputs, out)
    T, k = out.indices.shape
    cap = sys.modules["moeload.workloads.model"].expert_capacity(T, k, module.num_experts, module.capacity_factor)
    return Routing(counts=counts, capacity=cap, tokens=T, probs=out.probs)


class WorkloadAdapter(Adapter):
    """Finds every `TopKRouter` of the embedded MoE GPT (`moeload.workloads`)."""

    name = "moeload-workload"

    def describe(self) -> str:
        return "moeload.workloads.TopKRouter"

    def find(self, model: nn.Module) -> list[GateSpec]:
        mod = sys.modules.get("moeload.workloads.model")
        if mod is None:  # not imported: the model cannot hold one
            return []
        from moeload._version import __version__

        # routers whose indices are a topk over their E scores; subclasses (e.g. act's ReplicaRouter,
        # which routes to replica slots) may route elsewhere, so they are binned like any gate
        exact = {mod.TopKRouter, getattr(mod, "BiasRouter", mod.TopKRouter)}
        return [
            GateSpec(
                module=m,
                name=name,
                num_experts=m.num_experts,
                top_k=m.top_k,
                counts=_routing_capacity if type(m) in exact and m.capacity_factor is not None else _routing,
                has_kept=m.capacity_factor is not None,
                framework="moeload",
                framework_version=__version__,
                ids_in_range=type(m) in exact,
            )
            for name, m in model.named_modules()
            if isinstance(m, mod.TopKRouter)
        ]
