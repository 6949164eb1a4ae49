"""Expert replicas for megatron-core (`MoELayer` with `SequentialMLP` experts): a hot expert on two (or more)
slots, its tokens split between the copies, the copies' gradients summed.

megatron-core's token dispatchers (allgather, alltoall, flex) take `routing_map [T, num_moe_experts]` and
`probs [T, num_moe_experts]` from the router and send column p to EP rank p // (num_moe_experts / EP),
local expert p % (num_moe_experts / EP): a column is a slot to them. So the layer is built with
`num_moe_experts = S = E + R` slots, and `enable_replicas(layer, E)` swaps its router for a
`ReplicaRouter`: a `TopKRouter` built from a copy of the layer's config with `num_moe_experts = E`. Its
weight, bias, expert bias, aux losses (aux, seq-aux, global-aux, z-loss), capacity dropping and router
replay are those of a plain layer of E experts (TopKRouter's own code runs over E columns). Its forward then
expands the logical `[T, E]` outputs to `[T, S]`: the routes of logical expert e alternate between its n
copies by their order in e's column on this rank (the i-th token routed to e goes to copy i % n, the home
slot first), with their probs. Nothing in megatron-core changes; the dispatcher sees S experts.

Slot s lives on EP rank s // (S / ep_size). Initial layout: rank r's first E / ep_size slots hold logical
experts r * E / ep_size, ... (the plain layer's contiguous map), its other slots are free;
`ReplicaRouter.slot_expert` ([S], -1 free) is the map in force; `slot_logical` ([S] buffer, E for a free
slot) is what a LoadTracer reads slot ids through, so traced counts stay logical [E]. `slot_counts` holds the
last forward's routes per slot [S].

Copies start identical (`add_replica` copies parameters, gradients and optimizer state from the primary,
collectively over the EP group) and stay identical: `sync_replica_grads(model)` sums the copies' gradients
over the EP group after backward (after the data-parallel reduction of expert gradients), before
`optimizer.step()`, once per optimizer step.

Refused (InputError): GroupedMLP / TEGroupedMLP experts (one tensor for all local experts),
`moe_pad_expert_input_to_capacity` (the router pads the logical columns to the logical capacity, while the
alltoall dispatcher pads every slot to the capacity of S experts), megatron DDP's `main_grad` buffers and
megatron's optimizer wrappers (a plain torch optimizer only, as for `act.megatron.permute_experts`), and
`act.megatron.permute_experts` / `apply_layout` on a replica layer (one slot per expert there; the `Replacer` drives
replica layers through `add_replica` / `remove_replica`, and `load_state_dict` restores the slot map).
"""

from __future__ import annotations

import copy
import time
from types import SimpleNamespace
from typing import Any

import torch
from megatron.core.transformer.moe.router import TopKRouter

from moeload.act._exchange import copy_slot, sum_copy_grads
from moeload.act._slots import SlotMap, initial_slots
from moeload.act.megatron import _check_optimizer, _ep_size
from moeload.errors import InputError


class ReplicaRouter(SlotMap, TopKRouter):
    """A TopKRouter over E logical experts whose outputs address S >= E slots (see the module docstring).

    router: the layer's TopKRouter (its settings and process groups are kept, its weights are not);
    slot_expert: [S] logical expert held by each slot, -1 for a free slot; every expert has >= 1 slot;
    ep_size: the layer's; slot s is on EP rank s // (S / ep_size)."""

    def __init__(self, router: TopKRouter, num_experts: int, slot_expert: list[int], ep_size: int) -> None:
        config = copy.copy(router.config)
        config.num_moe_experts = num_experts
        groups = SimpleNamespace(
            tp=router.tp_group, cp=router.cp_group, tp_cp=router.tp_cp_group, tp_dp_cp=router.tp_dp_cp_group
        )
        super().__init__(config=config, pg_collection=groups)
        self.to(router.weight.device)
        self.set_layer_number(router.layer_number)
        self.num_slots, self.ep_size = len(slot_expert), ep_size
        self.slot_counts: torch.Tensor | None = None
        self.set_slots(slot_expert)

    @property
    def num_logical(self) -> int:
        return int(self.config.num_moe_experts)

    def slot_device(self) -> torch.device:
        return self.weight.device

    def forward(
        self, input: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """TopKRouter's forward over E logical experts -> (probs [T, S], routing_map [T, S] bool)."""
        probs, routing_map = super().forward(input, padding_mask)  # [T, E] each
        E, S = routing_map.shape[-1], self.num_slots
        kept = routing_map.bool()
        # [T, E] the route's place in its expert's column: one flat cumsum over the expert-major [E, T] (a cumsum
        # down the rows of [T, E] runs as E serial threads on CUDA; see workloads.model.slot_positions)
        col = kept.t().contiguous().long()  # [E, T]
        running = col.view(-1).cumsum(0).view_as(col)
        order = (running - (running[:, -1:] - col.sum(1, keepdim=True)) - 1).t()
        copy_ = order.clamp(min=0) % self._copies  # [T, E] which copy takes it
        slot = self._copy_slot[torch.arange(E, device=kept.device).expand_as(copy_), copy_]
        slot = torch.where(kept, slot, S)  # [T, E]; unrouted entries to a spare column, dropped below
        T = kept.shape[0]
        probs_s = torch.zeros(T, S + 1, dtype=probs.dtype, device=probs.device).scatter_add(1, slot, probs)[:, :S]
        map_s = torch.zeros(T, S + 1, dtype=torch.bool, device=kept.device).scatter(1, slot, kept)[:, :S]
        self.slot_counts = map_s.sum(0).detach()
        return probs_s, map_s


def _experts(moe_layer: Any) -> list[torch.nn.Module]:
    """A megatron-core MoELayer with SequentialMLP experts -> its local experts (InputError otherwise)."""
    router, experts = getattr(moe_layer, "router", None), getattr(moe_layer, "experts", None)
    if getattr(router, "weight", None) is None or experts is None or not hasattr(moe_layer, "local_expert_indices"):
        raise InputError(f"moe_layer: expected a megatron-core MoELayer, got {type(moe_layer).__name__}")
    local = getattr(experts, "local_experts", None)
    if local is None:
        raise InputError(
            f"moe_layer: experts are {type(experts).__name__}; only SequentialMLP experts "
            "(moe_grouped_gemm=False) can hold replicas"
        )
    return list(local)


def replica_router(moe_layer: Any) -> ReplicaRouter:
    """The ReplicaRouter of a megatron-core MoELayer (InputError when `enable_replicas` was not called on it)."""
    _experts(moe_layer)
    if not isinstance(moe_layer.router, ReplicaRouter):
        raise InputError("moe_layer: has no replica router; call enable_replicas(layer, num_experts) first")
    return moe_layer.router


def enable_replicas(moe_layer: Any, num_experts: int) -> ReplicaRouter:
    """Give a megatron-core MoELayer built with S expert slots (`num_moe_experts=S`) a router of
    `num_experts` (E < S) logical experts: its TopKRouter becomes a ReplicaRouter with the same settings and
    the contiguous layout (rank r's first E / ep_size slots hold its experts, the rest are free).

    Call it before the optimizer is built: the router gets a new weight [E, hidden] (bias [E] where the
    layer's router had one), drawn by the config's init_method. The slots' parameters stay; copy the plain
    model's experts into the primary slots (and its router's weights into the new router) to continue it."""
    experts = _experts(moe_layer)
    ep = _ep_size(moe_layer)
    S = len(experts) * ep
    if S != moe_layer.config.num_moe_experts:
        raise InputError(f"moe_layer: {len(experts)} local experts x ep_size {ep} != num_moe_experts {S}")
    if not (0 < num_experts < S) or num_experts % ep:
        raise InputError(
            f"num_experts: expected a multiple of ep_size {ep} below the layer's {S} slots, got {num_experts}"
        )
    if isinstance(moe_layer.router, ReplicaRouter):
        raise InputError("moe_layer: replicas are already enabled")
    if not isinstance(moe_layer.router, TopKRouter):
        raise InputError(f"moe_layer: its router is {type(moe_layer.router).__name__}, not a megatron-core TopKRouter")
    if getattr(moe_layer.config, "moe_pad_expert_input_to_capacity", False):
        raise InputError(
            "moe_layer: moe_pad_expert_input_to_capacity pads logical experts to their capacity and slots to "
            "theirs; replicas need it off"
        )
    if any(hasattr(p, "main_grad") for ex in experts for p in ex.parameters()):
        raise InputError("moe_layer: megatron DDP main_grad buffers; replicas need the unwrapped module")
    router = ReplicaRouter(moe_layer.router, num_experts, initial_slots(num_experts, S, ep), ep)
    moe_layer.router = router
    return router


def add_replica(moe_layer: Any, expert: int, slot: int, optimizer: Any = None, *, stage: bool | None = None) -> dict:
    """Make free `slot` a copy of logical `expert`, collectively over the layer's EP group (every rank
    calls, with the same arguments, at a step boundary): the primary's parameters, gradients and torch
    optimizer state are sent to the slot's rank. stage: payloads through host memory (`act._exchange`).
    -> {"expert", "slot", "src_slot", "bytes": what was copied, "stage_seconds", "seconds"}."""
    t0 = time.perf_counter()
    router = replica_router(moe_layer)
    experts = _experts(moe_layer)
    src = router.copy_source(expert, slot)
    if any(hasattr(p, "main_grad") for ex in experts for p in ex.parameters()):
        raise InputError("moe_layer: megatron DDP main_grad buffers; replicas need the unwrapped module")
    out = copy_slot(
        experts,
        src,
        slot,
        group=moe_layer.ep_group,
        ep_size=_ep_size(moe_layer),
        prepare=lambda me: _check_optimizer(optimizer, experts),
        stage=stage,
    )
    router.assign(slot, expert)
    return {"expert": expert, "slot": slot, "src_slot": src, **out, "seconds": time.perf_counter() - t0}


def remove_replica(moe_layer: Any, slot: int) -> None:
    """Free `slot`, a copy of an expert that has another copy (every rank of the EP group calls it, with
    the same slot; nothing is sent). Its parameters stay; the next `add_replica` there overwrites them."""
    replica_router(moe_layer).free_copy(slot)


def sync_replica_grads(model: Any) -> dict:
    """Sum the gradients of every replicated expert's copies over its layer's EP group, so that each copy
    holds the whole expert's gradient (a collective: every rank calls, after backward and the data-parallel
    reduction of expert gradients, before `optimizer.step()`, once per optimizer step). model: a module
    holding MoELayers with replica routers, or one such layer. -> {"experts": replicated experts synced,
    "bytes": gradient bytes all-reduced per rank, "seconds"}."""
    t0 = time.perf_counter()
    layers = [m for m in model.modules() if isinstance(getattr(m, "router", None), ReplicaRouter)]
    synced, nbytes = 0, 0
    for m in layers:
        copies = m.router.replicated()
        nbytes += sum_copy_grads(_experts(m), copies, group=m.ep_group, ep_size=_ep_size(m))
        synced += len(copies)
    return {"experts": synced, "bytes": nbytes, "seconds": time.perf_counter() - t0}
