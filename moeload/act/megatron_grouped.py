"""Permutation of megatron-core `GroupedMLP` experts (the local spec with `moe_grouped_gemm=True`): the
exchange of `act._exchange`, one local expert at a time, as for `SequentialMLP`.

GroupedMLP holds its L local experts in two parameters, `weight1` [H, L * F1] and `weight2` [L * F, H]
(F1 = F, or 2F with `gated_linear_unit`: the GLU's two halves are each expert's own columns); its forward
reads them as `weight1.view(L, H, F1)` and `weight2.view(L, F, H)`, so local expert j is the j-th of L equal
contiguous chunks of each, and of their gradients and optimizer state tensors (Adam's moments have the
parameter's shape). `expert_slots` gives one module per local expert whose two parameters are those chunks
(views that share the layer's storage); `exchange_hooks` gives `act.megatron.permute_experts` the prepare
and permute steps of `move_experts` for them. A slot's payload is its chunks of weight1 and weight2, their
gradients and optimizer state, and the scalar state (Adam's step) once per slot, as a SequentialMLP
expert's, so the bytes reported are the chunks moved. Parameters are written in place; the received
gradients and optimizer state are written back into the chunks of the layer's tensors before the router's
rows are permuted.

Refused (InputError): `TEGroupedMLP` (Transformer Engine's grouped linear layers), because Transformer
Engine does not install without CUDA, so it could not be built or tested here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from moeload.errors import InputError


class _Slot(nn.Module):
    """Local expert j of a GroupedMLP: its chunks of weight1 [H, F1] and weight2 [F, H] as two parameters
    that share the layer's storage (no gradient of their own; the exchange sets `.grad` as it moves)."""

    def __init__(self, chunks: list[torch.Tensor]) -> None:
        super().__init__()
        self.w1, self.w2 = (nn.Parameter(c, requires_grad=False) for c in chunks)


def _chunks(experts: Any, t: torch.Tensor, k: int) -> torch.Tensor:
    """A tensor of weight1's (k = 0) or weight2's (k = 1) shape -> its per-expert views, as GroupedMLP.forward
    reads them: [L, H, F1] or [L, F, H]."""
    L, H = experts.num_local_experts, experts.config.hidden_size
    return t.view(L, H, -1) if k == 0 else t.view(L, -1, H)


def _flat(experts: Any) -> list[torch.Tensor]:
    return [experts.weight1, experts.weight2]


def expert_slots(experts: Any) -> list[nn.Module]:
    """A megatron-core GroupedMLP -> one `_Slot` per local expert [L], views of its weights (InputError for
    TEGroupedMLP and any other class without SequentialMLP's `local_experts`)."""
    name = type(experts).__name__
    if name == "TEGroupedMLP":
        raise InputError(
            "moe_layer: TEGroupedMLP experts (Transformer Engine) are not supported: Transformer Engine does not "
            "install without CUDA, so that path is untested; use SequentialMLP or GroupedMLP experts"
        )
    flat = [getattr(experts, n, None) for n in ("weight1", "weight2")]
    L = getattr(experts, "num_local_experts", None)
    if not all(isinstance(w, torch.Tensor) for w in flat) or not isinstance(L, int) or L < 1:
        raise InputError(f"moe_layer: experts are {name}; only SequentialMLP and GroupedMLP experts can be permuted")
    views = [_chunks(experts, w.detach(), k) for k, w in enumerate(_flat(experts))]
    slots: list[nn.Module] = []
    for j in range(L):
        s = _Slot([v[j] for v in views])
        for p, w, k in zip(s.parameters(), _flat(experts), (0, 1)):
            if w.grad is not None:
                p.grad = _chunks(experts, w.grad, k)[j]
        slots.append(s)
    return slots


class _ChunkState:
    """The optimizer state of the slots' parameters, as `move_experts` reads and writes it (`.state` only):
    chunk j of each state tensor of the parameter's shape; scalar state as it is."""

    def __init__(self, experts: Any, slots: list[nn.Module], opt: torch.optim.Optimizer) -> None:
        self.state: dict[torch.Tensor, dict] = {}
        for k, w in enumerate(_flat(experts)):
            st = opt.state.get(w, {})
            for j, s in enumerate(slots):
                p = list(s.parameters())[k]
                self.state[p] = {
                    key: _chunks(experts, t, k)[j] if isinstance(t, torch.Tensor) and t.shape == w.shape else t
                    for key, t in st.items()
                }


def _write_back(experts: Any, slots: list[nn.Module], opt: torch.optim.Optimizer | None, shadow: Any) -> None:
    """Each slot's gradients and optimizer state (as the exchange left them) -> the chunks of the layer's
    weight1 / weight2 gradients and state; the parameters were written in place already."""
    for k, w in enumerate(_flat(experts)):
        ps = [list(s.parameters())[k] for s in slots]
        grads = [p.grad for p in ps]
        if all(g is None for g in grads):
            w.grad = None
        elif any(g is None for g in grads):
            raise InputError("moe_layer: the ranks disagree on whether GroupedMLP's weights have gradients")
        else:
            if w.grad is None:
                w.grad = torch.empty_like(w)
            for dst, g in zip(_chunks(experts, w.grad, k), grads):
                dst.copy_(g)
        if opt is None:
            continue
        states = [shadow.state.get(p, {}) for p in ps]
        keys = {key for st in states for key in st}
        if not keys:
            opt.state.pop(w, None)
            continue
        if any(set(st) != keys for st in states):
            raise InputError("moe_layer: the ranks' optimizers disagree on the state of GroupedMLP's weights")
        old = opt.state.get(w, {})
        new = {}
        for key in sorted(keys, key=str):
            parts = [st[key] for st in states]
            if parts[0].dim():
                t = old[key] if key in old and old[key].shape == w.shape else torch.empty_like(w)
                for dst, src in zip(_chunks(experts, t, k), parts):
                    dst.copy_(src)
            else:
                if any(not torch.equal(parts[0], q) for q in parts[1:]):
                    raise InputError(f"moe_layer: the ranks' optimizers disagree on {key!r} of GroupedMLP's weights")
                t = parts[0].clone()
            new[key] = t
        opt.state[w] = new


def exchange_hooks(
    moe_layer: Any, slots: list[nn.Module], optimizer: Any
) -> tuple[Callable[[], torch.optim.Optimizer | None], Callable[[Any, np.ndarray], None]]:
    """The (prepare, permute) steps of `move_experts` for a GroupedMLP layer's `expert_slots`: prepare checks
    the optimizer against the layer's weight1 / weight2 and returns the slots' `_ChunkState` (None without an
    optimizer); permute writes the slots' gradients and state back, then permutes the router's rows with the
    torch optimizer."""
    from moeload.act.megatron import _check_optimizer, _permute_router

    held: list[torch.optim.Optimizer | None] = [None]

    def prepare() -> torch.optim.Optimizer | None:
        held[0] = _check_optimizer(optimizer, [moe_layer.experts])
        if held[0] is None:
            return None
        return cast(torch.optim.Optimizer, _ChunkState(moe_layer.experts, slots, held[0]))  # .state only

    def permute(shadow: Any, src_slot: np.ndarray) -> None:
        _write_back(moe_layer.experts, slots, held[0], shadow)
        _permute_router(moe_layer.router, held[0], src_slot)

    return prepare, permute
