"""Expert replicas for DeepSpeed MoE (`deepspeed.moe.layer.MoE`): a hot expert on two (or more) slots,
its tokens split between the copies, the copies' gradients summed.

The layer is built with `S = E + R` expert slots (`MoE(num_experts=S)`, S divisible by ep_size) while the
router keeps E logical outputs: `enable_replicas(layer, E)` swaps its gate for a `ReplicaGate`. That gate
routes exactly as DeepSpeed's `TopKGate` over E experts (it runs TopKGate's own forward: the same top-k,
capacity, drops, l_aux, noise and RTS draws) and then sends each kept route of logical expert e to one
of e's slots: its copies alternate by the route's position in e's capacity buffer (location l goes to
copy l % n at location l // n). Slot s lives on EP rank s // (S / ep_size), as DeepSpeed's dispatch puts
it. Which tokens drop is decided per logical expert before the split, so drops are those of the plain
layer; the slot capacity is this step's largest slot count over the EP group (one more all-reduce), so
no kept token is dropped by the split.

Copies start identical (`add_replica` copies parameters, gradients and optimizer state from the
primary, collectively over the EP group) and stay identical: `sync_replica_grads(model)` sums the
copies' gradients over the EP group after backward, before `optimizer.step()` (once per step, after
DeepSpeed's own gradient all-reduce), so each copy applies the whole expert's update.

Initial layout: rank r's first E / ep_size slots hold logical experts r * E / ep_size, ... (the contiguous
map of the plain layer), its other slots are free; `ReplicaGate.slot_expert` ([S], -1 free) is the map in
force. The gate's `exp_counts` (and so a LoadTracer's routed counts) stay per logical expert [E];
`slot_counts` holds the last forward's kept routes per slot [S]. The slot map is saved in the layer's
state_dict (the gate's extra state) and installed by load_state_dict.

Not handled: ZeRO and fp16/bf16 optimizer wrappers; gradient clipping by the engine (copies count twice in
its norm); `act.deepspeed.permute_experts` on a replica layer (it assumes one slot per expert).
`Replacer` (`act.loop`) does drive replica layers: it turns slot plans into `add_replica` / `remove_replica`
calls (`act.slot_plan`); calling `sync_replica_grads` each step stays the caller's job.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.moe.sharded_moe import TopKGate

from moeload.act._exchange import copy_slot, sum_copy_grads
from moeload.act._slots import SlotMap, initial_slots
from moeload.act.deepspeed import _torch_optimizer
from moeload.errors import InputError


class ReplicaGate(SlotMap, TopKGate):
    """A TopKGate over E logical experts that dispatches to S >= E slots (see the module docstring).

    slot_expert: [S] logical expert held by each slot, -1 for a free slot; every expert has >= 1 slot.
    ep_size: the layer's; slot s is on EP rank s // (S / ep_size)."""

    def __init__(self, gate: TopKGate, num_experts: int, slot_expert: list[int], ep_size: int) -> None:
        super().__init__(
            gate.wg.in_features,
            num_experts,
            k=gate.k,
            capacity_factor=gate.capacity_factor,
            eval_capacity_factor=gate.eval_capacity_factor,
            min_capacity=gate.min_capacity,
            noisy_gate_policy=gate.noisy_gate_policy,
            drop_tokens=gate.drop_tokens,
            use_rts=gate.use_rts,
            ep_group=gate.ep_group,
            top2_2nd_expert_sampling=gate.top2_2nd_expert_sampling,
        )
        self.wg.to(device=gate.wg.weight.device, dtype=gate.wg.weight.dtype)
        self.num_slots, self.ep_size = len(slot_expert), ep_size
        self.slot_counts: torch.Tensor | None = None
        self.set_slots(slot_expert)

    @property
    def num_logical(self) -> int:
        return int(self.wg.out_features)

    def slot_device(self) -> torch.device:
        return self.wg.weight.device

    def forward(
        self,
        input: torch.Tensor,
        used_token: torch.Tensor | None = None,
        sparse_routes: bool = False,
        use_tutel: bool = False,
    ) -> Any:
        l_aux, _, _, idx, loc, gates, exp_counts = super().forward(input, used_token, True, use_tutel)
        e = idx.long()  # [k, T] logical expert of each route, -1 where capacity dropped it
        kept = e >= 0
        ec = e.clamp(min=0)
        n = self._copies[ec]
        slot = torch.where(kept, self._copy_slot[ec, loc.long() % n], -1)  # [k, T]
        where = torch.where(kept, loc.long() // n, 0)  # [k, T] location in the slot's buffer
        S = self.num_slots
        counts = torch.zeros(S + 1, dtype=torch.int64, device=slot.device)
        counts = counts.index_add_(0, torch.where(kept, slot, S).reshape(-1), torch.ones_like(slot).reshape(-1))[:S]
        self.slot_counts = counts.detach()
        capacity = counts.max().clamp(min=1)
        if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        if sparse_routes:
            return l_aux, capacity, S, slot.to(torch.int32), where.to(torch.int32), gates, exp_counts
        C, T = int(capacity), input.shape[0]  # the dense form of TopKGate: combine_weights [T, S, C]
        combine = torch.zeros(T, S + 1, C, dtype=gates.dtype, device=gates.device)
        tok = torch.arange(T, device=slot.device).expand_as(slot)
        combine = combine.index_put(
            (tok.reshape(-1), torch.where(kept, slot, S).reshape(-1), where.reshape(-1)),
            gates.reshape(-1),
            accumulate=True,
        )[:, :S]
        return l_aux, combine, combine.bool(), exp_counts


def _moe(layer: Any) -> Any:
    moe = getattr(layer, "deepspeed_moe", layer)
    if getattr(moe, "experts", None) is None or getattr(moe.experts, "deepspeed_experts", None) is None:
        raise InputError(f"moe_layer: expected a deepspeed.moe.layer.MoE, got {type(layer).__name__}")
    return moe


def replica_gate(layer: Any) -> ReplicaGate:
    """The ReplicaGate of a DeepSpeed MoE layer (InputError when `enable_replicas` was not called on it)."""
    gate = getattr(_moe(layer), "gate", None)
    if not isinstance(gate, ReplicaGate):
        raise InputError("moe_layer: has no replica gate; call enable_replicas(layer, num_experts) first")
    return gate


def enable_replicas(moe_layer: Any, num_experts: int) -> ReplicaGate:
    """Give a DeepSpeed MoE layer built with S expert slots (`MoE(num_experts=S)`) a router of
    `num_experts` (E < S) logical experts: its TopKGate becomes a ReplicaGate with the same settings and
    the contiguous layout (rank r's first E / ep_size slots hold its experts, the rest are free).

    Call it before the optimizer (or `deepspeed.initialize`) is built: the gate gets a new weight [E, hidden].
    The slots' parameters stay; copy the plain model's experts into the primary slots to continue it."""
    moe = _moe(moe_layer)
    S, ep = len(moe.experts.deepspeed_experts) * int(moe.ep_size), int(moe.ep_size)
    if not (0 < num_experts < S) or num_experts % ep:
        raise InputError(
            f"num_experts: expected a multiple of ep_size {ep} below the layer's {S} slots, got {num_experts}"
        )
    if isinstance(moe.gate, ReplicaGate):
        raise InputError("moe_layer: replicas are already enabled")
    if "sparse_routes" not in inspect.signature(TopKGate.forward).parameters:
        raise InputError("enable_replicas: needs a DeepSpeed whose TopKGate returns sparse routes (0.19.4 or later)")
    if moe.ep_group is not None:
        raise InputError(
            "moe_layer: its expert-parallel group is set, so its engine exists; call enable_replicas "
            "before deepspeed.initialize (the gate gets a new weight the optimizer must hold)"
        )
    moe.gate = ReplicaGate(moe.gate, num_experts, initial_slots(num_experts, S, ep), ep)
    return moe.gate


def add_replica(moe_layer: Any, expert: int, slot: int, optimizer: Any = None, *, stage: bool | None = None) -> dict:
    """Make free `slot` a copy of logical `expert`, collectively over the layer's EP group (every rank
    calls, with the same arguments, at a step boundary): the primary's parameters, gradients and
    optimizer state (the torch optimizer or the DeepSpeed engine) are sent to the slot's rank.
    stage: payloads through host memory (`act._exchange`; by default for gloo with device tensors).
    -> {"expert", "slot", "src_slot", "bytes": what was copied, "stage_seconds", "seconds"}."""
    t0 = time.perf_counter()
    moe = _moe(moe_layer)
    gate = replica_gate(moe)
    experts = list(moe.experts.deepspeed_experts)
    Ls = len(experts)
    src = gate.copy_source(expert, slot)

    def prepare(me: int) -> torch.optim.Optimizer | None:
        opt = _torch_optimizer(optimizer)
        if opt is not None and me in (src // Ls, slot // Ls):
            held = {id(p) for g in opt.param_groups for p in g["params"]}
            if any(id(p) not in held for p in experts[(src if me == src // Ls else slot) % Ls].parameters()):
                raise InputError("optimizer: does not hold this layer's expert parameters")
        return opt

    out = copy_slot(experts, src, slot, group=moe.ep_group, ep_size=int(moe.ep_size), prepare=prepare, stage=stage)
    gate.assign(slot, expert)
    return {"expert": expert, "slot": slot, "src_slot": src, **out, "seconds": time.perf_counter() - t0}


def remove_replica(moe_layer: Any, slot: int) -> None:
    """Free `slot`, a copy of an expert that has another copy (every rank of the EP group calls it, with
    the same slot; nothing is sent). Its parameters stay; the next `add_replica` there overwrites them."""
    replica_gate(moe_layer).free_copy(slot)


def sync_replica_grads(model: Any) -> dict:
    """Sum the gradients of every replicated expert's copies over its layer's EP group, so that each
    copy holds the whole expert's gradient (a collective: every rank calls, after backward and DeepSpeed's
    gradient all-reduce, before `optimizer.step()`, once per step). model: the engine, a module, or one
    MoE layer. -> {"experts": replicated experts synced, "bytes": gradient bytes all-reduced per rank,
    "seconds"}."""
    t0 = time.perf_counter()
    while hasattr(model, "module") and hasattr(model.module, "named_modules"):
        model = model.module
    layers = [m for m in model.modules() if isinstance(getattr(m, "gate", None), ReplicaGate)]
    synced, nbytes = 0, 0
    for moe in layers:
        copies = moe.gate.replicated()
        nbytes += sum_copy_grads(
            list(moe.experts.deepspeed_experts), copies, group=moe.ep_group, ep_size=int(moe.ep_size)
        )
        synced += len(copies)
    return {"experts": synced, "bytes": nbytes, "seconds": time.perf_counter() - t0}
