"""The `Placement` result type shared by every policy, and input checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import numpy as np

from moeload._balance import max_over_mean
from moeload.errors import InputError


class Evaluation(NamedTuple):
    """Loads realised under a placement: `gpu_load: [..., L, G]`, `imbalance: [..., L]` max / mean."""

    gpu_load: np.ndarray
    imbalance: np.ndarray


def slot_gpu(num_slots: int, num_gpus: int) -> np.ndarray:
    """[num_slots] GPU of each physical slot: slot s is on GPU `s // (num_slots // num_gpus)`.

    The one home of this layout (DeepSeek EPLB's): GPU g holds the contiguous slots
    `g * k .. (g + 1) * k - 1`, k = num_slots // num_gpus; `check_sizes` ensures num_gpus divides it.
    """
    return np.arange(num_slots) // (num_slots // num_gpus)


def gpu_loads(per_slot: np.ndarray, num_gpus: int) -> np.ndarray:
    """`per_slot: [..., R]` load of each slot -> `[..., num_gpus]` summed over each GPU's slots.

    Sums over the blocks of `slot_gpu(R, num_gpus)` (a reshape: the same layout, without a bincount).
    """
    return per_slot.reshape(per_slot.shape[:-1] + (num_gpus, per_slot.shape[-1] // num_gpus)).sum(-1)


def imbalance_of(gpu_load: np.ndarray) -> np.ndarray:
    """Max / mean over the last axis of `gpu_load: [..., G]` -> `[...]`; 1.0 where every GPU is idle."""
    return max_over_mean(gpu_load, idle=1.0)


@dataclass(frozen=True)
class Placement:
    """Units (experts or heads) on `num_gpus` GPUs with `num_replicas // num_gpus` slots each.

    phy2log: [L, num_replicas] logical unit held by each physical slot; slot s is on GPU
        `s // (num_replicas // num_gpus)`.
    share: [L, num_replicas] fraction of its unit's load that each slot serves; the shares of one
        unit's slots sum to 1 (even split: 1 / replica count).
    weight: [L, E] the loads the plan was made for.
    """

    phy2log: np.ndarray
    share: np.ndarray
    num_gpus: int
    weight: np.ndarray
    policy: str = ""
    info: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        check_sizes(int(self.weight.shape[-1]), int(self.num_gpus), int(self.phy2log.shape[-1]))

    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_replicas(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.weight.shape[1])

    @property
    def slots_per_gpu(self) -> int:
        return self.num_replicas // self.num_gpus

    @property
    def slot_gpu(self) -> np.ndarray:
        """[num_replicas] GPU of each physical slot."""
        return slot_gpu(self.num_replicas, self.num_gpus)

    @cached_property
    def replica_counts(self) -> np.ndarray:
        """[L, E] number of physical slots holding each logical unit."""
        out = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        for layer in range(self.num_layers):
            out[layer] = np.bincount(self.phy2log[layer], minlength=self.num_experts)
        return out

    @cached_property
    def log2phy(self) -> np.ndarray:
        """[L, E, max_copies] physical slots of each logical unit, ascending, -1 padded."""
        width = int(self.replica_counts.max())
        out = np.full((self.num_layers, self.num_experts, width), -1, dtype=np.int64)
        for layer in range(self.num_layers):
            order = np.argsort(self.phy2log[layer], kind="stable")
            units = self.phy2log[layer, order]
            starts = np.searchsorted(units, units, side="left")
            out[layer, units, np.arange(units.size) - starts] = order
        return out

    def evaluate(self, weight: np.ndarray) -> Evaluation:
        """Realised loads for other loads `weight: [..., L, E]` (or `[E]` for one layer).

        Returns `Evaluation(gpu_load [..., L, G], imbalance [..., L])`, each slot serving its
        `share` of its unit's load.
        """
        w = np.asarray(weight, dtype=np.float64)
        if w.ndim == 1:
            w = w[None, :]
        if w.shape[-2:] != (self.num_layers, self.num_experts):
            raise InputError(
                f"weight: shape {w.shape} does not end in (layers, experts) = "
                f"({self.num_layers}, {self.num_experts}) of this placement"
            )
        per_slot = np.take_along_axis(w, np.broadcast_to(self.phy2log, w.shape[:-1] + self.phy2log.shape[-1:]), -1)
        per_slot = per_slot * self.share
        gpu_load = gpu_loads(per_slot, self.num_gpus)
        return Evaluation(gpu_load, imbalance_of(gpu_load))

    @cached_property
    def gpu_load(self) -> np.ndarray:
        """[L, num_gpus] load of each GPU under the planned `weight` and `share`."""
        return self.evaluate(self.weight).gpu_load

    @cached_property
    def imbalance(self) -> np.ndarray:
        """[L] max / mean GPU load under the planned `weight`."""
        return imbalance_of(self.gpu_load)

    def moves_from(self, other: Placement) -> np.ndarray:
        """[L] slots whose logical unit differs from `other` (migration cost of switching plans)."""
        if other.phy2log.shape != self.phy2log.shape:
            return np.full(self.num_layers, self.num_replicas, dtype=np.int64)
        return (other.phy2log != self.phy2log).sum(axis=1)


def even_share(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """`phy2log: [L, R]` -> `[L, R]` share 1 / (copies of the slot's unit)."""
    share = np.empty(phy2log.shape, dtype=np.float64)
    for layer in range(phy2log.shape[0]):
        counts = np.bincount(phy2log[layer], minlength=num_experts)
        share[layer] = 1.0 / counts[phy2log[layer]]
    return share


def check_weight(weight: np.ndarray, name: str = "weight") -> np.ndarray:
    """`weight: [L, E]` or `[E]` -> float64 `[L, E]`; finite and non-negative, else InputError."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim == 1:
        w = w[None, :]
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
        raise InputError(f"{name}: expected shape [L, E] or [E], got {np.shape(weight)}")
    if not np.all(np.isfinite(w)):
        raise InputError(f"{name}: contains NaN or infinite values")
    if np.any(w < 0):
        raise InputError(f"{name}: contains negative loads (min {w.min()})")
    return w


def check_sizes(num_experts: int, num_gpus: int, num_replicas: int) -> None:
    """InputError unless 1 <= num_gpus, num_experts <= num_replicas and num_gpus divides num_replicas."""
    for name, value in (("num_gpus", num_gpus), ("num_replicas", num_replicas)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{name}: expected a positive integer, got {value!r}")
    if num_replicas < num_experts:
        raise InputError(
            f"num_replicas={num_replicas} is smaller than the number of experts {num_experts}; "
            "every expert needs at least one slot"
        )
    if num_replicas % num_gpus:
        raise InputError(
            f"num_replicas={num_replicas} is not a multiple of num_gpus={num_gpus}; "
            "every GPU must hold the same number of slots"
        )
