"""Re-placement by permutation, as arrays: which physical slot holds which logical expert.

A layer of `E` experts over `ep_size` expert-parallel ranks has `E` physical slots; slot `p` lives on
rank `p // L`, local index `p % L` (`L = E // ep_size`), which is where DeepSpeed's and megatron-core's
dispatch send the router's output column `p`. An expert->rank map `expert_to_rank: [E]` (logical
expert -> rank, each rank exactly `L` experts) fixes the layout: rank `r`'s slots hold the logical
experts mapped to `r` in increasing order (`phy2log`). The contiguous map `e // L` is the identity
layout. Pure NumPy; no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from moeload.errors import InputError


def contiguous_expert_to_rank(num_experts: int, ep_size: int) -> np.ndarray:
    """The frameworks' default map (`moeload.trace.layout`, the one home of that formula). -> [E] int64"""
    from moeload.trace.layout import contiguous_expert_to_rank as contiguous

    return np.asarray(contiguous(num_experts, ep_size), dtype=np.int64)


def check_expert_to_rank(
    expert_to_rank: object, num_experts: int, ep_size: int, name: str = "new_expert_to_rank"
) -> np.ndarray:
    """Validate a map logical expert -> rank; -> [E] int64. Raises InputError (one line) when its
    length is not `num_experts`, an entry is not an integer in [0, ep_size), or a rank does not get
    exactly num_experts // ep_size experts."""
    if isinstance(expert_to_rank, (str, bytes)):
        raise InputError(f"{name}: expected a sequence of {num_experts} integer ranks, got a string")
    try:
        a = np.asarray(expert_to_rank)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name}: expected a sequence of {num_experts} integer ranks ({e})") from None
    if a.ndim != 1 or a.shape[0] != num_experts:
        raise InputError(f"{name}: expected {num_experts} entries (one rank per expert), got shape {list(a.shape)}")
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise InputError(f"{name}: entries must be integer ranks, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating) and not (np.isfinite(a).all() and (a == np.round(a)).all()):
        raise InputError(f"{name}: entries must be integer ranks, got {a.tolist()}")
    a = a.astype(np.int64)
    bad = np.flatnonzero((a < 0) | (a >= ep_size))
    if bad.size:
        raise InputError(f"{name}: expert {int(bad[0])} maps to rank {int(a[bad[0]])}, outside [0, {ep_size})")
    per_rank = np.bincount(a, minlength=ep_size)
    want = num_experts // ep_size
    if num_experts % ep_size or (per_rank != want).any():
        raise InputError(
            f"{name}: each of the {ep_size} ranks must hold {want} experts, got {per_rank.tolist()} experts per rank"
        )
    return a


def phy2log(expert_to_rank: np.ndarray) -> np.ndarray:
    """Physical slot -> logical expert for a (valid) map: rank r's slots hold its experts in
    increasing id order. expert_to_rank: [E] -> [E] int64"""
    e2r = np.asarray(expert_to_rank, dtype=np.int64)
    return np.lexsort((np.arange(e2r.size), e2r)).astype(np.int64)


@dataclass(frozen=True)
class Moves:
    """What a re-placement does, all arrays over physical slots [E].

    src_slot[p]: the old slot whose content (expert weights, their optimizer state, and the router's
    row) slot p receives; transfers: rows (src_rank, src_local, dst_rank, dst_local, logical) for the
    slots whose content changes rank, [T, 5]; local: the same for moves within a rank, [T', 5]."""

    old_phy2log: np.ndarray
    new_phy2log: np.ndarray
    src_slot: np.ndarray
    transfers: np.ndarray
    local: np.ndarray
    num_local: int

    @property
    def is_identity(self) -> bool:
        return bool((self.src_slot == np.arange(self.src_slot.size)).all())


def plan_moves(old_expert_to_rank: npt.ArrayLike, new_expert_to_rank: object, ep_size: int) -> Moves:
    """Old and new maps logical expert -> rank ([E] each) -> the slot moves between their layouts."""
    old = check_expert_to_rank(old_expert_to_rank, np.size(old_expert_to_rank), ep_size, "old_expert_to_rank")
    new = check_expert_to_rank(new_expert_to_rank, old.size, ep_size)
    n_local = old.size // ep_size
    old_p2l, new_p2l = phy2log(old), phy2log(new)
    old_l2p = np.argsort(old_p2l)
    src = old_l2p[new_p2l]  # [E]: new slot p <- old slot holding logical new_p2l[p]
    dst = np.arange(old.size)
    rows = np.stack([src // n_local, src % n_local, dst // n_local, dst % n_local, new_p2l], 1).astype(np.int64)
    moved = src != dst
    cross = rows[:, 0] != rows[:, 2]
    return Moves(old_p2l, new_p2l, src.astype(np.int64), rows[moved & cross], rows[moved & ~cross], n_local)
