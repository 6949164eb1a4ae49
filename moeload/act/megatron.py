"""Re-placement by permutation for megatron-core (`MoELayer` with `SequentialMLP` or `GroupedMLP` experts,
EP >= 1; GroupedMLP's per-expert chunks of its two weight tensors are moved by `act.megatron_grouped`).

megatron-core's token dispatchers send the router's column p to EP rank p // L, local expert p % L
(`MoELayer.local_expert_indices`). To move logical expert e to rank r, `permute_experts` moves e's
parameters, gradients and optimizer state to a slot p on r and permutes the router's rows (weight,
bias, their optimizer state, and the `expert_bias`, `local_tokens_per_expert` and
`global_tokens_per_expert` buffers) so that row p is e's old row: every token reaches the same
weights as before and the aux losses (sums over experts) are unchanged, so the layer computes the
same function.

All ranks of the layer's expert-parallel group (`moe_layer.ep_group`, megatron's
`parallel_state.get_expert_model_parallel_group()`) call it together at a step boundary (after
`optimizer.step()`, before the next forward). Parameters keep their identity; only their contents change.

Refused (InputError): `TEGroupedMLP` experts (Transformer Engine, which does not install here),
group-limited routing (`moe_router_num_groups`: the groups are blocks of slots, so a permutation
changes which experts compete), megatron's DDP (`main_grad` buffers) and megatron's optimizer
wrappers (only a plain torch optimizer is moved). Checkpoints hold experts by slot: save the map
with them (`act.checkpoint`). Tracers see slot ids; `expert_to_rank(layer)` gives the map in force.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moeload.act._exchange import move_experts, permute_rows
from moeload.act.permute import contiguous_expert_to_rank, plan_moves
from moeload.errors import InputError

_MAP_ATTR = "moeload_expert_to_rank"
_ROUTER_BUFFERS = ("expert_bias", "local_tokens_per_expert", "global_tokens_per_expert")


def _local_experts(moe_layer: Any) -> list[torch.nn.Module]:
    """A megatron-core MoELayer -> its local experts [L] (InputError for anything else)."""
    router, experts = getattr(moe_layer, "router", None), getattr(moe_layer, "experts", None)
    if getattr(router, "weight", None) is None or experts is None or not hasattr(moe_layer, "local_expert_indices"):
        raise InputError(f"moe_layer: expected a megatron-core MoELayer, got {type(moe_layer).__name__}")
    if isinstance(getattr(router, "slot_logical", None), torch.Tensor):
        raise InputError(
            "moe_layer: a layer with expert replicas (moeload.act.megatron_replicas.ReplicaRouter): permutation and "
            "layouts assume one slot per expert; move copies with add_replica / remove_replica (or the Replacer); "
            "its slot map is in its state_dict, so load_state_dict restores it without a layout"
        )
    local = getattr(experts, "local_experts", None)
    if local is None:  # GroupedMLP: one view module per local expert (InputError for other classes)
        from moeload.act.megatron_grouped import expert_slots

        local = expert_slots(experts)
    groups = getattr(moe_layer.config, "moe_router_num_groups", None)
    if groups is not None and groups > 1:
        raise InputError(
            f"moe_layer: group-limited routing (moe_router_num_groups={groups}) ties experts to "
            "blocks of slots; a permutation would change the routing"
        )
    return list(local)


def _ep_size(moe_layer: Any) -> int:
    group = getattr(moe_layer, "ep_group", None)
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def expert_to_rank(moe_layer: Any) -> list[int]:
    """The map logical expert -> EP rank in force for a megatron-core MoELayer: [E] (contiguous until
    the first `permute_experts`)."""
    _local_experts(moe_layer)
    m = getattr(moe_layer, _MAP_ATTR, None)
    if m is None:
        m = contiguous_expert_to_rank(moe_layer.router.weight.shape[0], _ep_size(moe_layer)).tolist()
    return list(m)


def _check_optimizer(optimizer: Any, experts: list[torch.nn.Module]) -> torch.optim.Optimizer | None:
    if optimizer is None:
        return None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise InputError(
            f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__} "
            "(megatron's optimizer wrappers are not supported)"
        )
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if any(p.requires_grad and id(p) not in held for ex in experts for p in ex.parameters()):
        raise InputError(
            "optimizer: does not hold this layer's expert parameters "
            "(pass the optimizer built over the model's parameters)"
        )
    return optimizer


def _permute_router(router: Any, opt: torch.optim.Optimizer | None, src_slot: np.ndarray) -> None:
    """Row p of the router's weight, bias (with their gradients and optimizer state) and per-expert
    buffers <- old row src_slot[p]."""
    permute_rows([router.weight, getattr(router, "bias", None)], opt, src_slot)
    with torch.no_grad():
        for name in _ROUTER_BUFFERS:
            b = getattr(router, name, None)
            if isinstance(b, torch.Tensor) and b.dim() == 1 and b.shape[0] == src_slot.size:
                b.copy_(b[torch.as_tensor(src_slot, device=b.device)])


def permute_experts(
    moe_layer: Any, new_expert_to_rank: list[int], optimizer: Any = None, *, stage: bool | None = None
) -> dict:
    """Move logical expert e of one megatron-core MoELayer to EP rank new_expert_to_rank[e], collectively.

    moe_layer: `megatron.core.transformer.moe.moe_layer.MoELayer` with SequentialMLP or GroupedMLP experts;
    new_expert_to_rank: [E] ranks of the layer's EP group, each exactly E / ep_size experts;
    optimizer: the torch optimizer whose state (Adam's exp_avg, exp_avg_sq, step, ...) moves with the
    parameters; without it, any optimizer state stays with the slots, which is wrong for a stateful
    optimizer. Gradients, where present, move too. stage: payloads through host memory
    (`act._exchange`; by default for a gloo group with device tensors, e.g. several ranks on one GPU).
    The layer and the map are checked before any communication (InputError on every rank alike);
    problems found on one rank only (the optimizer) are shared first, so that every rank raises.
    -> {"expert_to_rank": [E], "experts_moved": logical experts that changed rank, "bytes_sent",
    "bytes_received": this rank's, "bytes_total": the group's, "stage_seconds": this rank's host
    staging copies, "seconds": this call's wall time}.
    """
    t0 = time.perf_counter()
    experts = _local_experts(moe_layer)
    ep_size = _ep_size(moe_layer)
    num_experts = moe_layer.router.weight.shape[0]
    if len(experts) * ep_size != num_experts:
        raise InputError(f"moe_layer: {len(experts)} local experts x ep_size {ep_size} != {num_experts} router rows")
    old = expert_to_rank(moe_layer)
    moves = plan_moves(old, new_expert_to_rank, ep_size)
    new = [int(r) for r in np.asarray(new_expert_to_rank, dtype=np.int64)]
    if any(hasattr(p, "main_grad") for p in moe_layer.experts.parameters()):
        raise InputError(
            "moe_layer: its parameters have megatron DDP main_grad buffers; wrapped models are "
            "not supported (permute the unwrapped module with a plain torch optimizer)"
        )
    group = moe_layer.ep_group
    if getattr(moe_layer.experts, "local_experts", None) is None:  # GroupedMLP (act.megatron_grouped)
        from moeload.act.megatron_grouped import exchange_hooks

        prepare, permute = exchange_hooks(moe_layer, experts, optimizer)
    else:
        prepare, permute = (
            (lambda: _check_optimizer(optimizer, experts)),
            (lambda opt, src: _permute_router(moe_layer.router, opt, src)),
        )
    out = move_experts(
        experts,
        moves,
        old,
        new,
        group=group,
        ep_size=ep_size,
        prepare=prepare,
        permute=permute,
        t0=t0,
        stage=stage,
    )
    if not moves.is_identity:
        setattr(moe_layer, _MAP_ATTR, new)
    return out
