"""The exchange both re-placement backends share: each local expert's slot (parameters, gradients,
optimizer state) packed, sent point-to-point over the expert-parallel group, and unpacked into its
new slot; and the row permutation of the router / gate parameters that keeps the function unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moeload.act.permute import Moves
from moeload.errors import InputError


def slot_payload(expert: torch.nn.Module, opt: torch.optim.Optimizer | None) -> tuple[list, list[torch.Tensor]]:
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
                raise InputError(
                    f"optimizer: state {key!r} of an expert parameter is {type(t).__name__} "
                    f"{list(getattr(t, 'shape', []))}, not a tensor of the parameter's shape or a scalar"
                )
            items.append(("state", key, t))
        for kind, key, t in items:
            meta.append((i, kind, key, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.device.type == "cpu"))
            tensors.append(t.detach().to(p.device).contiguous())
    return meta, tensors


def apply_slot(
    expert: torch.nn.Module, opt: torch.optim.Optimizer | None, meta: list, tensors: list[torch.Tensor]
) -> None:
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


def permute_rows(params: Any, opt: torch.optim.Optimizer | None, src_slot: np.ndarray) -> None:
    """Row p of each parameter (with its gradient and optimizer state) <- old row src_slot[p]."""
    with torch.no_grad():
        for p in params:
            if p is None:
                continue
            idx = torch.as_tensor(src_slot, device=p.device)
            p.data.copy_(p.data[idx])
            if p.grad is not None:
                p.grad.copy_(p.grad[idx.to(p.grad.device)])
            for t in (opt.state.get(p, {}) if opt is not None else {}).values():
                if isinstance(t, torch.Tensor) and t.shape == p.shape:
                    t.copy_(t[idx.to(t.device)])


def move_experts(
    experts: list[torch.nn.Module],
    moves: Moves,
    old: list[int],
    new: list[int],
    *,
    group: Any,
    ep_size: int,
    prepare: Callable[[], torch.optim.Optimizer | None],
    permute: Callable[[torch.optim.Optimizer | None, np.ndarray], None],
    t0: float,
) -> dict:
    """Apply `moves` to this rank's `experts`, collectively over `group` (see the backends' permute_experts).

    prepare() checks rank-local things (the optimizer) and returns the torch optimizer; its InputError
    is shared with every rank before anything moves. permute(opt, src_slot) permutes the router rows.
    """
    me = dist.get_rank(group) if ep_size > 1 else 0

    error, opt, payload = "", None, []
    try:
        opt = prepare()
        payload = [slot_payload(ex, opt) for ex in experts]
    except InputError as e:
        if moves.is_identity:
            raise
        error = str(e)
    if moves.is_identity:  # the same decision on every rank: nothing to send, no collective
        return {
            "expert_to_rank": new,
            "experts_moved": 0,
            "bytes_sent": 0,
            "bytes_received": 0,
            "bytes_total": 0,
            "seconds": time.perf_counter() - t0,
        }
    metas = [(error, [m for m, _ in payload])]
    if ep_size > 1:
        metas = [None] * ep_size  # type: ignore[list-item]  # filled by all_gather_object
        dist.all_gather_object(metas, (error, [m for m, _ in payload]), group=group)
    errors = [f"rank {r}: {err}" for r, (err, _) in enumerate(metas) if err]
    if errors:
        raise InputError(errors[0] if error == "" else error)

    def nbytes(meta: list) -> int:
        return sum(
            int(np.prod(shape)) * torch.empty(0, dtype=getattr(torch, dt)).element_size()
            for _, _, _, shape, dt, _ in meta
        )

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
    local = {
        dst_l: (payload[src_l][0], [t.clone() for t in payload[src_l][1]])
        for src_r, src_l, dst_r, dst_l, _ in moves.local.tolist()
        if dst_r == me
    }
    if ops:
        for w in dist.batch_isend_irecv(ops):
            w.wait()
    for dst_l, (meta, tensors) in {**received, **local}.items():
        apply_slot(experts[dst_l], opt, meta, tensors)
    permute(opt, moves.src_slot)
    device = next(experts[0].parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = sum(nbytes(metas[s_r][1][s_l]) for s_r, s_l, *_ in moves.transfers.tolist())
    return {
        "expert_to_rank": new,
        "experts_moved": int((np.asarray(old) != np.asarray(new)).sum()),
        "bytes_sent": sent,
        "bytes_received": got,
        "bytes_total": total,
        "seconds": time.perf_counter() - t0,
    }
