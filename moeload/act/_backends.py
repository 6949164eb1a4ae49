"""The MoE layers a model holds, and the act backend of each: DeepSpeed `deepspeed.moe.layer.MoE`
("deepspeed") or megatron-core `MoELayer` ("megatron"). Found by their attributes; neither framework
is imported here.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


def moe_layers(model: Any) -> list[tuple[str, str, Any]]:
    """model (an nn.Module; a DeepSpeed engine or DDP wrapper is unwrapped) -> [(module path, backend,
    layer)] for its DeepSpeed MoE layers and megatron-core MoELayers, in module order."""
    while hasattr(model, "module") and hasattr(model.module, "named_modules"):
        model = model.module
    out = []
    for name, m in model.named_modules():
        if hasattr(m, "deepspeed_moe"):
            out.append((name, "deepspeed", m))
        elif hasattr(m, "local_expert_indices") and hasattr(m, "router") and hasattr(m, "experts"):
            out.append((name, "megatron", m))
    return out


def backend(name: str) -> ModuleType:
    """ "deepspeed" | "megatron" -> the act backend module (expert_to_rank, permute_experts)."""
    return importlib.import_module(f"moeload.act.{name}")


def ep_size(name: str, layer: Any) -> int:
    """The layer's expert-parallel size."""
    if name == "deepspeed":
        return int(layer.deepspeed_moe.ep_size)
    from moeload.act.megatron import _ep_size

    return _ep_size(layer)


def ep_group(name: str, layer: Any) -> Any:
    """The layer's expert-parallel process group (None where it has none)."""
    return layer.deepspeed_moe.ep_group if name == "deepspeed" else getattr(layer, "ep_group", None)


def gate(name: str, layer: Any) -> Any:
    """The module a tracer hooks for this layer: DeepSpeed's TopKGate, megatron-core's router."""
    return getattr(layer.deepspeed_moe, "gate", None) if name == "deepspeed" else layer.router
