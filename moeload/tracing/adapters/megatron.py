"""Megatron-core adapter: `megatron.core.transformer.moe.router.TopKRouter` (and subclasses).

From megatron-core 0.10 the router's forward returns `(probs [T, E], routing_map [T, E] bool)`;
this rank's counts are `routing_map.sum(0)`. Earlier versions returned `(scores [T, k],
indices [T, k])`; both forms are read. With `moe_expert_capacity_factor` set, the router applies
token dropping before returning, so the routing map holds the routes *kept* after capacity
dropping (routed counts before dropping are not visible in the output); the GateSpec then carries
`count_kind = "kept"`. With `moe_pad_expert_input_to_capacity` the map marks padded capacity slots
too, so the kept routes are read as `probs != 0` instead.

Expert parallelism: the parent `MoELayer` holds `num_local_experts` and `local_expert_indices`;
expert e lives on EP rank `e // num_local_experts`.

Replicas (`moeload.act.megatron_replicas.ReplicaRouter`): the router's config has E logical experts, its
outputs are [T, S] over slots and its `slot_logical` buffer ([S], E for a free slot) names each slot's
expert. Its counts are read per logical expert through that map, and the EP size from the S slots (the
parent's `num_local_experts` counts slots); `expert_to_rank` is the logical experts' home map.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch

from moeload.tracing.adapters.base import Adapter, GateSpec, Routing, RoutingShapeError

if TYPE_CHECKING:
    from torch import nn


def router_routing(module: nn.Module, inputs: tuple, out: Any) -> Routing:
    """One TopKRouter forward -> Routing(mask=routing_map [T, E]) or Routing(indices=[T, k]) (< 0.10);
    probs [T, E] (or scores [T, k]) go along for the NaN check."""
    if not isinstance(out, (tuple, list)) or len(out) < 2 or not all(isinstance(t, torch.Tensor) for t in out[:2]):
        raise RoutingShapeError(f"TopKRouter returned {type(out).__name__}; expected (probs, routing_map)")
    probs, second = out[0], out[1]
    cfg: Any = module.config  # a TransformerConfig
    slot_logical = getattr(module, "slot_logical", None)  # a ReplicaRouter: columns are slots [T, S]
    if isinstance(slot_logical, torch.Tensor) and second.dim() == 2 and second.shape[-1] == slot_logical.numel():
        E = int(cfg.num_moe_experts)
        per_slot = second.sum(0, dtype=torch.int64)
        counts = torch.zeros(E + 1, dtype=torch.int64, device=per_slot.device).index_add_(0, slot_logical, per_slot)
        return Routing(counts=counts[:E], tokens=second.shape[0], probs=probs)
    if second.dtype == torch.bool or (second.is_floating_point() and second.shape[-1] == cfg.num_moe_experts):
        if cfg.moe_expert_capacity_factor is not None and getattr(cfg, "moe_pad_expert_input_to_capacity", False):
            return Routing(mask=second & (probs != 0), probs=probs)
        return Routing(mask=second, probs=probs)
    return Routing(indices=second.reshape(-1, second.shape[-1]), probs=probs)


def _ep(layer: nn.Module | None, num_experts: int) -> tuple[int, int]:
    """(ep_size, ep_rank) from the parent MoELayer, else from megatron.core.parallel_state."""
    local = getattr(layer, "num_local_experts", None)
    idx = getattr(layer, "local_expert_indices", None)
    if isinstance(local, int) and local > 0 and idx:
        return num_experts // local, int(idx[0]) // local
    ps: Any = sys.modules.get("megatron.core.parallel_state")  # None without megatron: the except answers
    try:
        return ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    except Exception:  # parallel state not initialised: no expert parallelism
        return 1, 0


def _version() -> str | None:
    core = sys.modules.get("megatron.core")
    v = getattr(core, "__version__", None)
    if v is None:
        try:
            from importlib.metadata import version

            v = version("megatron-core")
        except Exception:
            v = None
    return v


class MegatronAdapter(Adapter):
    """Finds every megatron-core `TopKRouter` (routing map or top-k indices per forward)."""

    name = "megatron-core"

    def describe(self) -> str:
        return "megatron.core TopKRouter"

    def find(self, model: nn.Module) -> list[GateSpec]:
        mod = sys.modules.get("megatron.core.transformer.moe.router")
        if mod is None:
            return []
        parents = {id(getattr(m, "router", None)): m for m in model.modules() if hasattr(m, "router")}
        out = []
        for name, r in model.named_modules():
            if not isinstance(r, mod.TopKRouter):
                continue
            cfg = r.config
            E, k = int(cfg.num_moe_experts), int(cfg.moe_router_topk)
            slots = getattr(r, "slot_logical", None)  # a ReplicaRouter: the parent's experts are its slots
            ep, rank = _ep(parents.get(id(r)), int(slots.numel()) if isinstance(slots, torch.Tensor) else E)
            local = max(1, E // ep)
            spec = GateSpec(
                module=r,
                name=global_name(name, getattr(r, "layer_number", None)),
                num_experts=E,
                top_k=k,
                counts=router_routing,
                framework="megatron-core",
                framework_version=_version(),
                expert_to_rank=[e // local for e in range(E)] if ep > 1 else None,
                ep_size=ep,
                ep_rank=rank,
            )
            # the routing map is taken after capacity dropping: its counts are kept counts
            spec.count_kind = "kept" if cfg.moe_expert_capacity_factor is not None else "routed"
            out.append(spec)
        return out


def global_name(path: str, layer_number: int | None) -> str:
    """A router's module path with its stage-local layer index replaced by the global one: under
    pipeline parallelism every stage numbers its layers from `decoder.layers.0`, while the router
    knows its TransformerLayer's global `layer_number` (1-based, virtual stages included). The
    last numeric segment of the path (the layer's index in its container: `decoder.layers.<i>`)
    becomes `<layer_number - 1>`; a path without one gets `@layer<layer_number - 1>` appended, so
    two stages' routers never share a name. Unchanged without a layer number."""
    if not isinstance(layer_number, int) or isinstance(layer_number, bool) or layer_number < 1:
        return path
    parts = path.split(".")
    for j in range(len(parts) - 1, -1, -1):
        if parts[j].isdigit():
            parts[j] = str(layer_number - 1)
            return ".".join(parts)
    return f"{path}@layer{layer_number - 1}"


ADAPTER: Adapter = MegatronAdapter()

__all__ = ["ADAPTER", "MegatronAdapter", "global_name", "router_routing"]
