"""Re-placement by permutation for DeepSpeed MoE (`deepspeed.moe.layer.MoE`, ep_size >= 2).

DeepSpeed's dispatch sends the gate's expert id p to EP rank p // L, local expert p % L. To move
logical expert e to rank r, `permute_experts` moves e's parameters, gradients and optimizer state to
a slot p on r and permutes the gate's rows (weight, bias and their optimizer state) so that row p is
e's old row: every token reaches the same weights as before, so the layer computes the same function.
(Exactly so without random gating; with Random Token Selection on a dropping gate, or
`top2_2nd_expert_sampling`, the noise drawn for column p now falls on another expert: the same
function in distribution, not draw for draw.)

All ranks of the layer's expert-parallel group call it together at a step boundary (after
`optimizer.step()`, before the next forward). Parameters keep their identity (DeepSpeed's gradient
groups and the optimizer's param_groups stay valid); only their contents change.

Not handled here: ZeRO and fp16/bf16 optimizer wrappers (they flatten parameters; refused), and
DeepSpeed checkpoints, which name expert files by slot (`expert_{p}`), not by logical expert. The
gate's `exp_counts` and tracers see slot ids; `expert_to_rank(layer)` gives the map in force.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moeload.act.permute import contiguous_expert_to_rank, plan_moves
from moeload.errors import InputError

_MAP_ATTR = "moeload_expert_to_rank"


def _moe_layer(layer: Any) -> Any:
    """deepspeed.moe.layer.MoE or its MOELayer -> the MOELayer (InputError for anything else)."""
    moe = getattr(layer, "deepspeed_moe", layer)
    gate, experts = getattr(moe, "gate", None), getattr(moe, "experts", None)
    if getattr(gate, "wg", None) is None or getattr(experts, "deepspeed_experts", None) is None:
        raise InputError(f"moe_layer: expected a deepspeed.moe.layer.MoE, got {type(layer).__name__}")
    return moe


def expert_to_rank(layer: Any) -> list[int]:
    """The map logical expert -> EP rank in force for a DeepSpeed MoE layer: [E] (contiguous until
    the first `permute_experts`)."""
    moe = _moe_layer(layer)
    m = getattr(moe, _MAP_ATTR, None)
    if m is None:
        m = contiguous_expert_to_rank(moe.gate.wg.out_features, moe.ep_size).tolist()
    return list(m)


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    if optimizer is None or isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)  # a DeepSpeed engine holding a plain torch optimizer
    if isinstance(inner, torch.optim.Optimizer) and hasattr(optimizer, "module"):
        return inner
    raise InputError(f"optimizer: expected a torch.optim.Optimizer (or an engine wrapping one without ZeRO or "
                     f"fp16/bf16 wrappers), got {type(optimizer).__name__}")


def _slot_payload(expert: torch.nn.Module, opt: torch.optim.Optimizer | None) -> tuple[list, list[torch.Tensor]]:
    """One local expert -> (metadata rows (param index, kind, key, shape, dtype, on_cpu), tensors)."""
    meta, tensors = [], []
    for i, p in enumerate(expert.parameters()):
        items = [("param", "", p.data)]
        if p.grad is not None:
            items.append(("grad", "", p.grad))
        state = opt.state.get(p, {}) if opt is not None else {}
        for key in sorted(state, key=str):
            t = state[key]
            if not isinstance(t, torch.Tensor) or (t.dim() and t.shape != p.shape):
                raise InputError(f"optimizer: state {key!r} of an expert parameter is {type(t).__name__} "
                                 f"{list(getattr(t, 'shape', []))}, not a tensor of the parameter's shape or a scalar")
            items.append(("state", key, t))
        for kind, key, t in items:
            meta.append((i, kind, key, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.device.type == "cpu"))
            tensors.append(t.detach().to(p.device).contiguous())
    return meta, tensors


def _apply_slot(expert: torch.nn.Module, opt: torch.optim.Optimizer | None, meta: list,
                tensors: list[torch.Tensor]) -> None:
    params = list(expert.parameters())
    grads: dict[int, torch.Tensor] = {}
    states: dict[int, dict] = {i: {} for i in range(len(params))}
    for (i, kind, key, _, _, on_cpu), t in zip(meta, tensors):
        if kind == "param":
            params[i].data.copy_(t)
        elif kind == "grad":
            grads[i] = t
        else:
            states[i][key] = t.cpu() if on_cpu else t
    for i, p in enumerate(params):
        p.grad = grads.get(i)
        if opt is not None:
            if states[i]:
                opt.state[p] = states[i]
            else:
                opt.state.pop(p, None)


def _permute_gate(gate: Any, opt: torch.optim.Optimizer | None, src_slot: np.ndarray) -> None:
    """Row p of the gate's weight and bias (with their gradients and optimizer state) <- old row src_slot[p]."""
    for p in gate.wg.parameters():
        idx = torch.as_tensor(src_slot, device=p.device)
        with torch.no_grad():
            p.data.copy_(p.data[idx])
            if p.grad is not None:
                p.grad.copy_(p.grad[idx])
            for t in (opt.state.get(p, {}) if opt is not None else {}).values():
                if isinstance(t, torch.Tensor) and t.shape == p.shape:
                    t.copy_(t[idx.to(t.device)])


def permute_experts(moe_layer: Any, new_expert_to_rank: list[int], optimizer: Any = None) -> dict:
    """Move logical expert e of one DeepSpeed MoE layer to EP rank new_expert_to_rank[e], collectively.

    moe_layer: `deepspeed.moe.layer.MoE` (or its `deepspeed_moe`); new_expert_to_rank: [E] ranks of
    the layer's EP group, each exactly E / ep_size experts; optimizer: the torch optimizer (or the
    DeepSpeed engine) whose state (Adam's exp_avg, exp_avg_sq, step, ...) moves with the parameters;
    without it, any optimizer state stays with the slots, which is wrong for a stateful optimizer.
    Gradients, where present, move too.
    The map is validated before any communication (InputError on every rank alike); problems found
    on one rank only (the optimizer) are shared first, so that every rank raises.
    -> {"expert_to_rank": [E], "experts_moved": logical experts that changed rank, "bytes_sent",
    "bytes_received": this rank's, "bytes_total": the group's, "seconds": this call's wall time}.
    """
    t0 = time.perf_counter()
    moe = _moe_layer(moe_layer)
    ep_size = int(moe.ep_size)
    old = expert_to_rank(moe)
    moves = plan_moves(old, new_expert_to_rank, ep_size)
    new = [int(r) for r in np.asarray(new_expert_to_rank, dtype=np.int64)]
    group = moe.ep_group
    if ep_size > 1 and group is None:
        raise InputError("moe_layer: its expert-parallel group is not set; call after deepspeed.initialize "
                         "(or MoE.set_deepspeed_parallelism)")
    if ep_size > 1 and dist.get_world_size(group) != ep_size:
        raise InputError(f"moe_layer: ep_size {ep_size} but its group has {dist.get_world_size(group)} ranks")
    me = dist.get_rank(group) if ep_size > 1 else 0
    experts = list(moe.experts.deepspeed_experts)

    error, opt, payload = "", None, []
    try:
        opt = _torch_optimizer(optimizer)
        if opt is not None:
            held = {id(p) for g in opt.param_groups for p in g["params"]}
            if any(p.requires_grad and id(p) not in held for ex in experts for p in ex.parameters()):
                raise InputError("optimizer: does not hold this layer's expert parameters (pass the optimizer "
                                 "built over the model's parameters; ZeRO's flat partitions are not supported)")
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
    _permute_gate(moe.gate, opt, moves.src_slot)
    setattr(moe, _MAP_ATTR, new)
    device = next(experts[0].parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = sum(nbytes(metas[s_r][1][s_l]) for s_r, s_l, *_ in moves.transfers.tolist())
    return {"expert_to_rank": new, "experts_moved": int((np.asarray(old) != np.asarray(new)).sum()),
            "bytes_sent": sent, "bytes_received": got, "bytes_total": total, "seconds": time.perf_counter() - t0}
