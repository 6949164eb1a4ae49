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

Not handled here: ZeRO and fp16/bf16 optimizer wrappers (they flatten parameters; refused).
Checkpoints hold experts by slot (state dicts, DeepSpeed's `expert_{p}` files): save the map with them
(`act.checkpoint`). The gate's `exp_counts` and tracers see slot ids; `expert_to_rank(layer)` gives the
map in force.
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


def _moe_layer(layer: Any) -> Any:
    """deepspeed.moe.layer.MoE or its MOELayer -> the MOELayer (InputError for anything else)."""
    moe = getattr(layer, "deepspeed_moe", layer)
    gate, experts = getattr(moe, "gate", None), getattr(moe, "experts", None)
    if getattr(gate, "wg", None) is None or getattr(experts, "deepspeed_experts", None) is None:
        raise InputError(f"moe_layer: expected a deepspeed.moe.layer.MoE, got {type(layer).__name__}")
    if getattr(gate, "slot_logical", None) is not None:
        raise InputError(
            "moe_layer: a layer with expert replicas (moeload.act.replicas.ReplicaGate): permutation and "
            "layouts assume one slot per expert; move copies with add_replica / remove_replica (or the "
            "Replacer); its slot map is in its state_dict, so load_state_dict restores it without a layout"
        )
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
    raise InputError(
        f"optimizer: expected a torch.optim.Optimizer (or an engine wrapping one without ZeRO or "
        f"fp16/bf16 wrappers), got {type(optimizer).__name__}"
    )


def _permute_gate(gate: Any, opt: torch.optim.Optimizer | None, src_slot: np.ndarray) -> None:
    """Row p of the gate's weight and bias (with their gradients and optimizer state) <- old row src_slot[p]."""
    permute_rows(list(gate.wg.parameters()), opt, src_slot)


def permute_experts(
    moe_layer: Any, new_expert_to_rank: list[int], optimizer: Any = None, *, stage: bool | None = None
) -> dict:
    """Move logical expert e of one DeepSpeed MoE layer to EP rank new_expert_to_rank[e], collectively.

    moe_layer: `deepspeed.moe.layer.MoE` (or its `deepspeed_moe`); new_expert_to_rank: [E] ranks of
    the layer's EP group, each exactly E / ep_size experts; optimizer: the torch optimizer (or the
    DeepSpeed engine) whose state (Adam's exp_avg, exp_avg_sq, step, ...) moves with the parameters;
    without it, any optimizer state stays with the slots, which is wrong for a stateful optimizer.
    Gradients, where present, move too. stage: payloads through host memory (`act._exchange`; by
    default for a gloo group with device tensors, e.g. several ranks on one GPU).
    The map is validated before any communication (InputError on every rank alike); problems found
    on one rank only (the optimizer) are shared first, so that every rank raises.
    -> {"expert_to_rank": [E], "experts_moved": logical experts that changed rank, "bytes_sent",
    "bytes_received": this rank's, "bytes_total": the group's, "stage_seconds": this rank's host
    staging copies, "seconds": this call's wall time}.
    """
    t0 = time.perf_counter()
    moe = _moe_layer(moe_layer)
    ep_size = int(moe.ep_size)
    old = expert_to_rank(moe)
    moves = plan_moves(old, new_expert_to_rank, ep_size)
    new = [int(r) for r in np.asarray(new_expert_to_rank, dtype=np.int64)]
    group = moe.ep_group
    if ep_size > 1 and group is None:
        raise InputError(
            "moe_layer: its expert-parallel group is not set; call after deepspeed.initialize "
            "(or MoE.set_deepspeed_parallelism)"
        )
    if ep_size > 1 and dist.get_world_size(group) != ep_size:
        raise InputError(f"moe_layer: ep_size {ep_size} but its group has {dist.get_world_size(group)} ranks")
    experts = list(moe.experts.deepspeed_experts)

    def prepare() -> torch.optim.Optimizer | None:
        opt = _torch_optimizer(optimizer)
        if opt is not None:
            held = {id(p) for g in opt.param_groups for p in g["params"]}
            if any(p.requires_grad and id(p) not in held for ex in experts for p in ex.parameters()):
                raise InputError(
                    "optimizer: does not hold this layer's expert parameters (pass the optimizer "
                    "built over the model's parameters; ZeRO's flat partitions are not supported)"
                )
        return opt

    out = move_experts(
        experts,
        moves,
        old,
        new,
        group=group,
        ep_size=ep_size,
        prepare=prepare,
        permute=lambda opt, src: _permute_gate(moe.gate, opt, src),
        t0=t0,
        stage=stage,
    )
    if not moves.is_identity:
        setattr(moe, _MAP_ATTR, new)
    return out
