"""DeepSpeed adapter: `deepspeed.moe.sharded_moe.TopKGate` (inside `deepspeed.moe.layer.MoE`) and the
AutoEP router `deepspeed.moe.ep_router.TokenChoiceTopKRouter`.

TopKGate, two output forms:
- from 0.19.4, `MOELayer` calls the gate with `sparse_routes=True`: `(l_aux, capacity, num_experts,
  indices [k, T] int32 with -1 for routes dropped by capacity, locations, gates, exp_counts [E])`;
- older versions, or the gate called on its own: `(l_aux, combine_weights [T, E, C],
  dispatch_mask [T, E, C] bool, exp_counts [E])`.
`exp_counts` counts this rank's routes before capacity dropping: recorded as routed counts. Kept
counts (after dropping) are recorded where the gate drops tokens (`drop_tokens=True`): where DeepSpeed
keeps exactly min(exp_counts[e], C) routes of expert e they are given as `Routing.capacity` = C (two
kernels for both rows), else they come from `indices >= 0` or `dispatch_mask.sum((0, 2))`. That holds
(0.19.x `sharded_moe`) for top-2 (expert e's first-choice routes get positions 0..n1-1, its second-choice
ones n1..n1+n2-1, and positions < C are kept) and top-1 without RTS and without `used_token` (a topk of
C rows over e's 0/1 mask keeps min(n, C) of its n routes); not for top-1 with RTS (a route's uniform draw
can be 0.0 and tie with the unrouted tokens) nor k > 2 (`drop_policy="probs"`: a topk over gate values,
which can underflow to 0 and tie likewise), nor a subclass that overrides `forward` or routes to replica
slots. C is `dispatch_mask.shape[2]`, or the returned capacity (a CPU tensor) read once per (T, k,
capacity factor, min_capacity). `l_aux` (a sum over the mean softmax of every expert)
is NaN iff a probability is: it is passed on as `Routing.probs` for the NaN check. Everything
stays on the gate's device.

TokenChoiceTopKRouter returns `(top_scores [T, k], selected_experts [T, k], num_tokens_per_expert
[E])`; it never drops, so routed counts only.

Expert parallelism: expert e of a layer lives on EP rank `e // num_local_experts`
(`trace.layout.contiguous_expert_to_rank`; DeepSpeed requires E % ep_size == 0) (the layout
`MOELayer` reshapes to after its all-to-all; AutoEP reads its placement descriptor).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from moeload.trace.layout import contiguous_expert_to_rank
from moeload.tracing.adapters.base import Adapter, GateSpec, Routing, RoutingShapeError

if TYPE_CHECKING:
    from torch import nn


_BIN_DTYPES = (torch.int16, torch.int32, torch.int64)  # ids bucketized as they are (no conversion kernel)


def bincount_device(idx: Tensor, num_experts: int, cache: dict[tuple, tuple[Tensor, Tensor]] | None = None) -> Tensor:
    """[E] int64 count of each expert id in `idx` (any shape; -1 / out of range ignored), no host sync:
    the bin of each id against boundaries [-1, 0, .., E-1] (bucketize), added into zeros [E + 2]
    (index_add_ of ones). cache: a dict that keeps the boundaries and ones per (dtype, device, size),
    so a call launches three kernels (bucketize, zeros, index_add_)."""
    flat = idx.reshape(-1)
    if flat.dtype not in _BIN_DTYPES:
        flat = flat.to(torch.int64)
    key = (flat.dtype, flat.device, flat.numel())
    made = None if cache is None else cache.get(key)
    if made is None:
        made = (
            torch.arange(-1, num_experts, dtype=flat.dtype, device=flat.device),
            torch.ones(flat.numel(), dtype=torch.int64, device=flat.device),
        )
        if cache is not None:
            if len(cache) >= 64:
                cache.clear()
            cache[key] = made
    bounds, ones = made
    out = torch.zeros(num_experts + 2, dtype=torch.int64, device=flat.device)
    return out.index_add_(0, torch.bucketize(flat, bounds), ones)[1 : num_experts + 1]


def gate_routing(module: nn.Module, inputs: tuple, out: Any, capacities: dict[tuple, int] | None = None) -> Routing:
    """One TopKGate forward -> Routing(counts=exp_counts [E], tokens, probs=l_aux; where it drops: capacity
    where kept = min(exp_counts, C) is exact (module docstring), else kept_ids = the sparse routes'
    indices [k, T], -1 dropped, or kept_counts [E] from the dense dispatch mask). capacities: the sparse
    form's C by (T, k, capacity factor, min_capacity), filled as read (without it the kept ids are used)."""
    wg: Any = module.wg  # the gate's nn.Linear
    E = wg.out_features
    if not isinstance(out, (tuple, list)):
        raise RoutingShapeError(f"TopKGate returned {type(out).__name__}; expected a tuple of 7 (sparse_routes) or 4")
    # moeload.act.replicas.ReplicaGate (a buffer): routes go to slots
    slot_logical = module._buffers.get("slot_logical", module.__dict__.get("slot_logical"))
    if len(out) == 7:  # sparse_routes: indices [k, T] (slot ids under replicas)
        idx, exp_counts = out[3], out[6]
        T = idx.shape[-1]
        if capacities is not None and slot_logical is None and _min_exact(module, inputs):
            cap = _sparse_capacity(module, out[1], T, capacities)
            if cap is not None:
                return Routing(counts=exp_counts, capacity=cap, tokens=T, probs=out[0])
        if isinstance(slot_logical, Tensor) and module.drop_tokens:
            idx = torch.where(idx >= 0, slot_logical[idx.clamp(min=0).long()], -1)
        if module.drop_tokens:  # the kept routes' ids, binned by the tracer into the kept row
            return Routing(counts=exp_counts, kept_ids=idx, tokens=_tokens(module, inputs, T), probs=out[0])
        return Routing(counts=exp_counts, tokens=_tokens(module, inputs, T), probs=out[0])
    if len(out) == 4:  # dense: dispatch_mask [T, E, C] ([T, S, C] under replicas)
        dispatch, exp_counts = out[2], out[3]
        T = dispatch.shape[0]
        if capacities is not None and slot_logical is None and _min_exact(module, inputs) and dispatch.dim() == 3:
            return Routing(counts=exp_counts, capacity=int(dispatch.shape[2]), tokens=T, probs=out[0])
        kept = dispatch.sum((0, 2), dtype=torch.int64) if module.drop_tokens else None
        if kept is not None and isinstance(slot_logical, Tensor):
            kept = torch.zeros(E + 1, dtype=torch.int64, device=kept.device).index_add_(0, slot_logical, kept)[:E]
    else:
        raise RoutingShapeError(f"TopKGate returned {len(out)} values; expected 7 (sparse_routes) or 4")
    return Routing(counts=exp_counts, kept_counts=kept, tokens=_tokens(module, inputs, T), probs=out[0])


def _min_exact(module: nn.Module, inputs: tuple) -> bool:
    """This forward kept exactly min(exp_counts[e], C) routes of each expert e (module docstring); the
    caller has checked that the gate is a plain TopKGate (`TopKGateReader`) without replica slots."""
    if not module.drop_tokens:
        return False
    g: Any = module
    return g.k == 2 or (g.k == 1 and not g.use_rts and (len(inputs) < 2 or inputs[1] is None))


def _sparse_capacity(module: nn.Module, c: Any, T: int, capacities: dict[tuple, int]) -> int | None:
    """The capacity C of a sparse-routes forward: returned by the gate as a CPU tensor (`_capacity` of T
    tokens, k, the capacity factor and min_capacity), read once per such key; None where it is not a
    host value (a tensor on a device: reading it would sync)."""
    key = (T, module.k, module.capacity_factor if module.training else module.eval_capacity_factor, module.min_capacity)
    cap = capacities.get(key)
    if cap is None:
        if type(c) is int:
            cap = c
        elif isinstance(c, Tensor) and c.device.type == "cpu" and c.numel() == 1 and not c.is_floating_point():
            cap = int(c)
        else:
            return None
        if len(capacities) >= 64:
            capacities.clear()
        capacities[key] = cap
    return cap


class TopKGateReader:
    """`gate_routing` for one plain TopKGate (its class does not override forward), with the capacities
    it has read (`gate_routing(capacities=...)`); a subclass's gate is read by `gate_routing` alone."""

    def __init__(self) -> None:
        self.capacities: dict[tuple, int] = {}

    def __call__(self, module: nn.Module, inputs: tuple, out: Any) -> Routing:
        return gate_routing(module, inputs, out, self.capacities)


def _tokens(module: nn.Module, inputs: tuple, T: int) -> int | Tensor:
    """Tokens that reached a TopKGate: T, or for top-1 only those marked used (`used_token`, on the device)."""
    if module.k == 1 and len(inputs) > 1 and isinstance(inputs[1], Tensor):
        return inputs[1].reshape(-1).sum(dtype=torch.int64)
    return T


def autoep_routing(module: nn.Module, inputs: tuple, out: Any) -> Routing:
    """One TokenChoiceTopKRouter forward -> Routing(counts=num_tokens_per_expert [E], tokens=T, probs=top_scores)."""
    return Routing(counts=out[2], tokens=out[1].shape[0], probs=out[0])


def _ep_rank(layer: nn.Module, ep_size: int) -> int:
    """This process's rank in the layer's expert-parallel group (group set by set_deepspeed_parallelism)."""
    dist = torch.distributed
    if ep_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return 0
    group = getattr(layer, "ep_group", None)
    if group is not None:
        return dist.get_rank(group=group)
    return dist.get_rank() % ep_size  # DeepSpeed's default: EP groups of consecutive ranks


def _version() -> str | None:
    ds = sys.modules.get("deepspeed")
    return getattr(ds, "__version__", None)


class DeepSpeedAdapter(Adapter):
    """Finds DeepSpeed MoE gates (`TopKGate`) and AutoEP routers (`TokenChoiceTopKRouter`)."""

    name = "deepspeed"

    def describe(self) -> str:
        return "deepspeed TopKGate / TokenChoiceTopKRouter"

    def find(self, model: nn.Module) -> list[GateSpec]:
        if "deepspeed" not in sys.modules:
            return []
        specs = []
        sharded = sys.modules.get("deepspeed.moe.sharded_moe")
        if sharded is not None:
            specs += self._topk_gates(model, sharded)
        ep_router = sys.modules.get("deepspeed.moe.ep_router")
        if ep_router is not None:
            specs += self._autoep_routers(model, ep_router)
        return specs

    def _topk_gates(self, model: nn.Module, sharded: Any) -> list[GateSpec]:
        layers = {id(m.gate): m for m in model.modules() if isinstance(m, sharded.MOELayer)}
        out = []
        for name, g in model.named_modules():
            if not isinstance(g, sharded.TopKGate):
                continue
            E = g.wg.out_features
            layer = layers.get(id(g))
            ep = int(getattr(layer, "ep_size", 1) or 1)
            out.append(
                GateSpec(
                    module=g,
                    name=name,
                    num_experts=E,
                    top_k=int(g.k),
                    counts=TopKGateReader() if type(g).forward is sharded.TopKGate.forward else gate_routing,
                    has_kept=bool(g.drop_tokens),
                    framework="deepspeed",
                    framework_version=_version(),
                    expert_to_rank=contiguous_expert_to_rank(E, ep) if ep > 1 else None,
                    ep_size=ep,
                    ep_rank=_ep_rank(layer, ep) if layer is not None else 0,
                )
            )
        return out

    def _autoep_routers(self, model: nn.Module, ep_router: Any) -> list[GateSpec]:
        owners = {}
        for m in model.modules():
            r = getattr(m, "router", None)
            if isinstance(r, ep_router.TokenChoiceTopKRouter) and hasattr(m, "ep_size"):
                owners[id(r)] = m
        out = []
        for name, r in model.named_modules():
            if not isinstance(r, ep_router.TokenChoiceTopKRouter):
                continue
            owner = owners.get(id(r))
            ep = int(getattr(owner, "ep_size", 1) or 1)
            out.append(
                GateSpec(
                    module=r,
                    name=name,
                    num_experts=int(r.num_experts),
                    top_k=int(r.top_k),
                    counts=autoep_routing,
                    framework="deepspeed",
                    framework_version=_version(),
                    expert_to_rank=_autoep_placement(owner, ep, int(r.num_experts))
                    if ep > 1 and owner is not None
                    else None,
                    ep_size=ep,
                    ep_rank=int(getattr(owner, "ep_rank", 0) or 0),
                )
            )
        return out


def _autoep_placement(owner: nn.Module, ep_size: int, num_experts: int) -> list[int]:
    """[E] EP rank of each expert from the AutoEP placement descriptor (contiguous if unreadable)."""
    desc = getattr(owner, "expert_placement_descriptor", None)
    try:
        from deepspeed.checkpoint.autoep_affine import autoep_experts_for_rank

        e2r = [-1] * num_experts
        for r in range(ep_size):
            for e in autoep_experts_for_rank(desc, r):
                e2r[int(e)] = r
        if min(e2r) >= 0:
            return e2r
    except Exception:  # older DeepSpeed without descriptors: the legacy contiguous layout
        pass
    return contiguous_expert_to_rank(num_experts, ep_size)


ADAPTER: Adapter = DeepSpeedAdapter()

__all__ = ["ADAPTER", "DeepSpeedAdapter", "TopKGateReader", "autoep_routing", "bincount_device", "gate_routing"]
