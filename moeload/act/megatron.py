"""Re-placement by permutation for megatron-core (`MoELayer` with `SequentialMLP` experts, EP >= 1).

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

Refused (InputError): `GroupedMLP`/`TEGroupedMLP` experts (one tensor for all local experts),
group-limited routing (`moe_router_num_groups`: the groups are blocks of slots, so a permutation
changes which experts compete), megatron's DDP (`main_grad` buffers) and megatron's optimizer
wrappers (only a plain torch optimizer is moved). Checkpoints name experts by slot; tracers see
slot ids; `expert_to_rank(layer)` gives the map in force.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moeload.act.deepspeed import _apply_slot, _slot_payload
from moeload.act.permute import contiguous_expert_to_rank, plan_moves
from moeload.errors import InputError

_MAP_ATTR = "moeload_expert_to_rank"
_ROUTER_BUFFERS = ("expert_bias", "local_tokens_per_expert", "global_tokens_per_expert")


def _local_experts(moe_layer: Any) -> list[torch.nn.Module]:
    """A megatron-core MoELayer -> its local experts [L] (InputError for anything else)."""
    router, experts = getattr(moe_layer, "router", None), getattr(moe_layer, "experts", None)
    if getattr(router, "weight", None) is None or experts is None or not hasattr(moe_layer, "local_expert_indices"):
        raise InputError(f"moe_layer: expected a megatron-core MoELayer, got {type(moe_layer).__name__}")
    local = getattr(experts, "local_experts", None)
    if local is None:
        raise InputError(f"moe_layer: experts are {type(experts).__name__}; only SequentialMLP experts "
                         "(moe_grouped_gemm=False) can be permuted")
    groups = getattr(moe_layer.config, "moe_router_num_groups", None)
    if groups is not None and groups > 1:
        raise InputError(f"moe_layer: group-limited routing (moe_router_num_groups={groups}) ties experts to "
                         "blocks of slots; a permutation would change the routing")
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
        raise InputError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__} "
                         "(megatron's optimizer wrappers are not supported)")
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if any(p.requires_grad and id(p) not in held for ex in experts for p in ex.parameters()):
        raise InputError("optimizer: does not hold this layer's expert parameters "
                         "(pass the optimizer built over the model's parameters)")
    return optimizer


def _permute_router(router: Any, opt: torch.optim.Optimizer | None, src_slot: np.ndarray) -> None:
    """Row p of the router's weight, bias (with their gradients and optimizer state) and per-expert
    buffers <- old row src_slot[p]."""
    with torch.no_grad():
        for p in (router.weight, getattr(router, "bias", None)):
            if p is None:
                continue
            idx = torch.as_tensor(src_slot, device=p.device)
            p.data.copy_(p.data[idx])
            if p.grad is not None:
                p.grad.copy_(p.grad[idx.to(p.grad.device)])
            for t in (opt.state.get(p, {}) if opt is not None else {}).values():
                if isinstance(t, torch.Tensor) and t.shape == p.shape:
                    t.copy_(t[idx.to(t.device)])
        for name in _ROUTER_BUFFERS:
            b = getattr(router, name, None)
            if isinstance(b, torch.Tensor) and b.dim() == 1 and b.shape[0] == src_slot.size:
                b.copy_(b[torch.as_tensor(src_slot, device=b.device)])


def permute_experts(moe_layer: Any, new_expert_to_rank: list[int], optimizer: Any = None) -> dict:
    """Move logical expert e of one megatron-core MoELayer to EP rank new_expert_to_rank[e], collectively.

    moe_layer: `megatron.core.transformer.moe.moe_layer.MoELayer` with SequentialMLP experts;
    new_expert_to_rank: [E] ranks of the layer's EP group, each exactly E / ep_size experts;
    optimizer: the torch optimizer whose state (Adam's exp_avg, exp_avg_sq, step, ...) moves with the
    parameters; without it, any optimizer state stays with the slots, which is wrong for a stateful
    optimizer. Gradients, where present, move too.
    The layer and the map are checked before any communication (InputError on every rank alike);
    problems found on one rank only (the optimizer) are shared first, so that every rank raises.
    -> {"expert_to_rank": [E], "experts_moved": logical experts that changed rank, "bytes_sent",
    "bytes_received": this rank's, "bytes_total": the group's, "seconds": this call's wall time}.
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
    if any(hasattr(p, "main_grad") for ex in experts for p in ex.parameters()):
        raise InputError("moe_layer: its parameters have megatron DDP main_grad buffers; wrapped models are "
                         "not supported (permute the unwrapped module with a plain torch optimizer)")
    group = moe_layer.ep_group
    me = dist.get_rank(group) if ep_size > 1 else 0

    error, opt, payload = "", None, []
    try:
        opt = _check_optimizer(optimizer, experts)
        payload = [_slot_payload(ex, opt) for ex in experts]
    except InputError as e:
        if moves.is_identity:
            raise
        error = str(e)
    if moves.is_identity:  # the same decision on every rank: nothing to send, no collective
        return {"expert_to_rank": new, "experts_moved": 0, "bytes_sent": 0, "bytes_received": 0, "bytes_total": 0,
                "seconds": time.perf_counter() - t0}
    metas = [(error, [m for m, _ in payload])]
    if ep_size > 1:
        metas = [None] * ep_size  # type: ignore[list-item]  # filled by all_gather_object
        dist.all_gather_object(metas, (error, [m for m, _ in payload]), group=group)
    errors = [f"rank {r}: {err}" for r, (err, _) in enumerate(metas) if err]
    if errors:
        raise InputError(errors[0] if error == "" else error)

    def nbytes(meta: list) -> int:
        return sum(int(np.prod(shape)) * torch.empty(0, dtype=getattr(torch, dt)).element_size()
                   for _, _, _, shape, dt, _ in meta)

    received: dict[int, tuple[list, list[torch.Tensor]]] = {}
    ops, sent, got = [], 0, 0
    for src_r, src_l, dst_r, dst_l, _ in moves.transfers.tolist():
        meta = metas[src_r][1][src_l]
        if src_r == me:
            peer = dist.get_global_rank(group, dst_r)
            ops += [dist.P2POp(dist.isend, t, peer, group) for t in payload[src_l][1]]
            sent += nbytes(meta)
        elif dst_r == me:
            peer = dist.get_global_rank(group, src_r)
            device = next(experts[dst_l].parameters()).device
            bufs = [torch.empty(shape, dtype=getattr(torch, dt), device=device) for _, _, _, shape, dt, _ in meta]
            ops += [dist.P2POp(dist.irecv, b, peer, group) for b in bufs]
            received[dst_l] = (meta, bufs)
            got += nbytes(meta)
    local = {dst_l: (payload[src_l][0], [t.clone() for t in payload[src_l][1]])
             for src_r, src_l, dst_r, dst_l, _ in moves.local.tolist() if dst_r == me}
    if ops:
        for w in dist.batch_isend_irecv(ops):
            w.wait()
    for dst_l, (meta, tensors) in {**received, **local}.items():
        _apply_slot(experts[dst_l], opt, meta, tensors)
    _permute_router(moe_layer.router, opt, moves.src_slot)
    setattr(moe_layer, _MAP_ATTR, new)
    device = next(experts[0].parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = sum(nbytes(metas[s_r][1][s_l]) for s_r, s_l, *_ in moves.transfers.tolist())
    return {"expert_to_rank": new, "experts_moved": int((np.asarray(old) != np.asarray(new)).sum()),
            "bytes_sent": sent, "bytes_received": got, "bytes_total": total, "seconds": time.perf_counter() - t0}
