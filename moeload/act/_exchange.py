"""The exchange both re-placement backends share: each local expert's slot (parameters, gradients,
optimizer state) packed, sent point-to-point over the expert-parallel group, and unpacked into its
new slot; and the row permutation of the router / gate parameters that keeps the function unchanged.
The replica backends share `copy_slot` (one slot's contents to another slot) and `sum_copy_grads`.

Staging: a gloo group cannot send device tensors point-to-point, so where the group's backend is gloo
and the experts are not on the CPU (several ranks on one GPU, which NCCL refuses), the payload goes
device -> host, over gloo, host -> device; `stage=True` forces the same path on the CPU (two host
copies), `stage=False` forbids it. The staging copies' seconds are returned apart ("stage_seconds").
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


def staged(group: Any, device: torch.device, stage: bool | None) -> bool:
    """Whether point-to-point payloads go through host memory: `stage` where given, else for a gloo
    group with device (non-CPU) tensors."""
    if stage is not None:
        return bool(stage)
    return device.type != "cpu" and dist.is_initialized() and dist.get_backend(group) == "gloo"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_host(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    """Copies of `tensors` in host memory (a real copy on the CPU too) -> (copies, seconds)."""
    t0 = time.perf_counter()
    out = [t.to("cpu", copy=True) for t in tensors]
    return out, time.perf_counter() - t0  # a copy to pageable host memory waits for the device


def to_device(tensors: list[torch.Tensor], device: torch.device) -> tuple[list[torch.Tensor], float]:
    """Copies of host `tensors` on `device` -> (copies, seconds, the device synchronized)."""
    t0 = time.perf_counter()
    out = [t.to(device, copy=True) for t in tensors]
    _sync(device)
    return out, time.perf_counter() - t0


def nbytes(meta: list) -> int:
    """The bytes of one `slot_payload`'s tensors, from its metadata rows."""
    return sum(
        int(np.prod(shape)) * torch.empty(0, dtype=getattr(torch, dt)).element_size() for _, _, _, shape, dt, _ in meta
    )


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
    stage: bool | None = None,
) -> dict:
    """Apply `moves` to this rank's `experts`, collectively over `group` (see the backends' permute_experts).

    prepare() checks rank-local things (the optimizer) and returns the torch optimizer; its InputError
    is shared with every rank before anything moves. permute(opt, src_slot) permutes the router rows.
    stage: see the module docstring.
    """
    me = dist.get_rank(group) if ep_size > 1 else 0
    device = next(experts[0].parameters()).device
    host = ep_size > 1 and staged(group, device, stage)
    stage_s = 0.0

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
            "stage_seconds": 0.0,
            "seconds": time.perf_counter() - t0,
        }
    metas = [(error, [m for m, _ in payload])]
    if ep_size > 1:
        metas = [None] * ep_size  # type: ignore[list-item]  # filled by all_gather_object
        dist.all_gather_object(metas, (error, [m for m, _ in payload]), group=group)
    errors = [f"rank {r}: {err}" for r, (err, _) in enumerate(metas) if err]
    if errors:
        raise InputError(errors[0] if error == "" else error)

    received: dict[int, tuple[list, list[torch.Tensor]]] = {}
    ops, sent, got = [], 0, 0
    for src_r, src_l, dst_r, dst_l, _ in moves.transfers.tolist():
        meta = metas[src_r][1][src_l]
        if src_r == me:
            peer = dist.get_global_rank(group, dst_r)
            out = payload[src_l][1]
            if host:
                out, s_ = to_host(out)
                stage_s += s_
            ops += [dist.P2POp(dist.isend, t, peer, group) for t in out]
            sent += nbytes(meta)
        elif dst_r == me:
            peer = dist.get_global_rank(group, src_r)
            where = torch.device("cpu") if host else device
            bufs = [torch.empty(shape, dtype=getattr(torch, dt), device=where) for _, _, _, shape, dt, _ in meta]
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
    if host:
        for dst_l, (meta, bufs) in received.items():
            bufs, s_ = to_device(bufs, device)
            received[dst_l] = (meta, bufs)
            stage_s += s_
    for dst_l, (meta, tensors) in {**received, **local}.items():
        apply_slot(experts[dst_l], opt, meta, tensors)
    permute(opt, moves.src_slot)
    _sync(device)
    total = sum(nbytes(metas[s_r][1][s_l]) for s_r, s_l, *_ in moves.transfers.tolist())
    return {
        "expert_to_rank": new,
        "experts_moved": int((np.asarray(old) != np.asarray(new)).sum()),
        "bytes_sent": sent,
        "bytes_received": got,
        "bytes_total": total,
        "stage_seconds": stage_s,
        "seconds": time.perf_counter() - t0,
    }


def copy_slot(
    experts: list[torch.nn.Module],
    src: int,
    dst: int,
    *,
    group: Any,
    ep_size: int,
    prepare: Callable[[int], torch.optim.Optimizer | None],
    stage: bool | None = None,
) -> dict:
    """Slot `dst` <- the contents of slot `src` (parameters, gradients, optimizer state), collectively over
    `group`; slot s is local expert s % L of EP rank s // L (L = len(experts), this rank's).

    prepare(me) checks rank-local things (the optimizer) and returns the torch optimizer; its InputError
    is shared with every rank before anything is sent. -> {"bytes": what was copied, "stage_seconds"}."""
    L = len(experts)
    (src_r, src_l), (dst_r, dst_l) = divmod(src, L), divmod(dst, L)
    me = dist.get_rank(group) if ep_size > 1 else 0
    error, opt = "", None
    meta: list[Any] = []
    tensors: list[torch.Tensor] = []
    try:
        opt = prepare(me)
        if me == src_r:
            meta, tensors = slot_payload(experts[src_l], opt)
    except InputError as e:
        error = str(e)
    shared: list[Any] = [(error, meta)]
    if ep_size > 1:
        shared = [None] * ep_size  # filled by all_gather_object
        dist.all_gather_object(shared, (error, meta), group=group)
    errors = [f"rank {r}: {err}" for r, (err, _) in enumerate(shared) if err]
    if errors:
        raise InputError(error or errors[0])
    meta = shared[src_r][1]
    device = next(experts[0].parameters()).device
    host = ep_size > 1 and src_r != dst_r and staged(group, device, stage)
    stage_s = 0.0
    if src_r == dst_r:
        if me == dst_r:
            apply_slot(experts[dst_l], opt, meta, [t.clone() for t in tensors])
    elif me == src_r:
        if host:
            tensors, stage_s = to_host(tensors)
        peer = dist.get_global_rank(group, dst_r)
        for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, t, peer, group) for t in tensors]):
            w.wait()
    elif me == dst_r:
        where = torch.device("cpu") if host else device
        tensors = [torch.empty(shape, dtype=getattr(torch, dt), device=where) for _, _, _, shape, dt, _ in meta]
        peer = dist.get_global_rank(group, src_r)
        for w in dist.batch_isend_irecv([dist.P2POp(dist.irecv, t, peer, group) for t in tensors]):
            w.wait()
        if host:
            tensors, stage_s = to_device(tensors, device)
        apply_slot(experts[dst_l], opt, meta, tensors)
    _sync(device)
    return {"bytes": nbytes(meta), "stage_seconds": stage_s}


def sum_copy_grads(experts: list[torch.nn.Module], copies: list[list[int]], *, group: Any, ep_size: int) -> int:
    """Every slot in copies[i] (slot ids of one expert's copies over the EP group, as in `copy_slot`) <- the
    sum of the gradients of all of them: one all-reduce of the flattened gradients over `group` (every rank
    calls, with the same `copies`, even one that holds none of them). -> the bytes all-reduced."""
    if not copies:
        return 0
    L = len(experts)
    me = dist.get_rank(group) if ep_size > 1 else 0
    first = list(experts[0].parameters())
    buf = torch.zeros(len(copies), sum(p.numel() for p in first), dtype=first[0].dtype, device=first[0].device)
    mine = [[experts[s % L] for s in slots if s // L == me] for slots in copies]
    for i, held in enumerate(mine):
        for ex in held:
            buf[i] += torch.cat(
                [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ex.parameters()]
            )
    if ep_size > 1:
        dist.all_reduce(buf, group=group)
    for i, held in enumerate(mine):
        for ex in held:
            for p, g in zip(ex.parameters(), buf[i].split([p.numel() for p in ex.parameters()])):
                if p.grad is None:
                    p.grad = g.view_as(p).clone()
                else:
                    p.grad.copy_(g.view_as(p))
    return buf.numel() * buf.element_size()
