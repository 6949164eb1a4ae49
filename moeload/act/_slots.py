"""The slot map shared by the replica gates of `act.replicas` (DeepSpeed) and `act.megatron_replicas`
(megatron-core): a router over E logical experts whose routes address S >= E expert slots.

`slot_expert` ([S], -1 for a free slot) is the map in force; every logical expert has at least one slot.
Slot s lives on EP rank s // (S / ep_size). An expert's copies are ordered home slot first (its slot in the
contiguous layout of the plain layer, where it still holds it), then by slot id; routes alternate between
them in that order. Buffers (not saved; they follow the module to its device): `_copies` [E] copies per
expert, `_copy_slot` [E, max copies] their slots (-1 pad), `slot_logical` [S] the logical expert of each slot
(E for a free one), which a LoadTracer reads slot ids through. The map itself is the module's extra state,
so it goes into the state_dict and load_state_dict installs it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from moeload.errors import InputError


def initial_slots(num_experts: int, num_slots: int, ep_size: int) -> list[int]:
    """Rank r's first E / ep_size slots hold logical experts r * E / ep_size, ... (the plain layer's
    contiguous map); its other slots are free (-1)."""
    L, Ls = num_experts // ep_size, num_slots // ep_size
    return [r * L + j if j < L else -1 for r in range(ep_size) for j in range(Ls)]


class SlotMap:
    """Mixin for an nn.Module router: the slot map, its buffers and its state. The router class says how
    many logical experts it has (`num_logical`) and where its weights are (`slot_device`), and sets
    `num_slots` and `ep_size` before its first `set_slots`."""

    num_slots: int
    ep_size: int
    slot_expert: list[int]
    register_buffer: Any  # nn.Module's

    @property
    def num_logical(self) -> int:
        raise NotImplementedError

    def slot_device(self) -> torch.device:
        raise NotImplementedError

    def set_slots(self, slot_expert: list[int]) -> None:
        """Install a slot map ([S] logical expert or -1); InputError unless every expert has a slot."""
        E, S = self.num_logical, self.num_slots
        a = np.asarray(slot_expert, dtype=np.int64)
        if a.shape != (S,) or ((a < -1) | (a >= E)).any():
            raise InputError(f"slot_expert: expected {S} entries in [-1, {E}), got {list(slot_expert)}")
        missing = sorted(set(range(E)) - set(a.tolist()))
        if missing:
            raise InputError(f"slot_expert: experts {missing} have no slot")
        copies = [self._order(np.flatnonzero(a == e).tolist(), e) for e in range(E)]
        table = np.full((E, max(len(c) for c in copies)), -1, dtype=np.int64)
        for e, c in enumerate(copies):
            table[e, : len(c)] = c
        self.slot_expert = [int(x) for x in a]
        dev = self.slot_device()
        self.register_buffer("_copies", torch.as_tensor([len(c) for c in copies], device=dev), persistent=False)
        self.register_buffer("_copy_slot", torch.as_tensor(table, device=dev), persistent=False)
        self.register_buffer("slot_logical", torch.as_tensor(np.where(a < 0, E, a), device=dev), persistent=False)

    def get_extra_state(self) -> dict:
        """The slot map goes into the layer's state_dict ("..._extra_state")."""
        return {"slot_expert": list(self.slot_expert)}

    def set_extra_state(self, state: Any) -> None:
        """load_state_dict installs the saved slot map (the slots' tensors load by slot beside it)."""
        self.set_slots(state["slot_expert"])

    def _order(self, slots: list[int], expert: int) -> list[int]:
        """Slots of `expert`, its home slot (the contiguous layout's) first where it holds it, then by id."""
        L, Ls = self.num_logical // self.ep_size, self.num_slots // self.ep_size
        home = expert // L * Ls + expert % L
        return sorted(slots, key=lambda s: (s != home, s))

    def copies(self, expert: int) -> list[int]:
        """The slots holding logical expert `expert`, primary (the home slot, where it holds it) first;
        routes alternate between them in this order."""
        return self._order([s for s, e in enumerate(self.slot_expert) if e == expert], expert)

    def replicated(self) -> list[list[int]]:
        """The slots of every expert that has more than one copy (what `sync_replica_grads` sums over)."""
        return [c for c in (self.copies(e) for e in range(self.num_logical)) if len(c) > 1]

    def copy_source(self, expert: int, slot: int) -> int:
        """`add_replica`'s checks: `expert` in range and `slot` free -> the slot to copy from (the primary)."""
        E = self.num_logical
        if not (0 <= expert < E) or not (0 <= slot < self.num_slots):
            raise InputError(
                f"add_replica: expert must be in [0, {E}) and slot in [0, {self.num_slots}), got {expert}, {slot}"
            )
        if self.slot_expert[slot] != -1:
            raise InputError(f"add_replica: slot {slot} holds expert {self.slot_expert[slot]}; pick a free slot")
        return self.copies(expert)[0]

    def assign(self, slot: int, expert: int) -> None:
        """Slot `slot` now holds `expert` (-1: free)."""
        self.set_slots([expert if s == slot else e for s, e in enumerate(self.slot_expert)])

    def free_copy(self, slot: int) -> None:
        """`remove_replica`: free `slot`, a copy of an expert that has another copy (InputError otherwise)."""
        e = self.slot_expert[slot] if 0 <= slot < self.num_slots else -1
        if e < 0 or len(self.copies(e)) < 2:
            raise InputError(f"remove_replica: slot {slot} is not a copy of an expert with another copy")
        self.assign(slot, -1)
