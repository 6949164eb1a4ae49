"""Which rank holds which gate: one agreement when the tracer is made, so every flush gathers a fixed layout.

Under pipeline parallelism each rank holds only its stage's gates; under tensor parallelism (without
sequence parallelism) several ranks run the same router on the same tokens. Each rank declares the
gates it holds (by their global layer name) and whether it is a replica of another rank; `reconcile`
turns the declarations of all ranks into one `RankLayout`, or refuses, on every rank alike, what
cannot be recorded truthfully (different `flush_every`, one layer with different expert counts...).

Every rank's device buffer then has the same shape `[F, P, width, W]` (width: the most gates any rank
holds), so a mismatch can never reach gloo or NCCL as a size error; the writer maps the gathered
`[R, F, P, width, W]` block to the global layers `[R, F, P, L, W]` on the host (`to_global`). Global
counts are sums over the ranks that hold a layer (its data- and expert-parallel replicas), never over
different layers; a replica rank's rows are compared with its primary's and then left out, so
tensor-parallel copies of one router are counted once.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from moeload.errors import InputError

LAYER_KEYS = ("num_experts", "top_k", "kind", "expert_to_rank", "bias")
"""Per-layer fields every rank that holds the layer must agree on."""
RUN_KEYS = ("flush_every", "record_eval", "kept", "ranks")
"""Tracer settings every rank must agree on."""


@dataclasses.dataclass(frozen=True)
class RankLayout:
    """The agreed layout. R ranks (of the tracer's group), L global layers."""

    layers: list[dict[str, Any]]
    """[L] global layer descriptors, in trace order (see `describe`)."""
    index: np.ndarray
    """[R, L] int: slot of global layer l in rank r's buffer, -1 where rank r does not hold it."""
    primary: np.ndarray
    """[R] int: the rank whose counts rank r's duplicate (r itself where r's counts are its own)."""
    width: int
    """Layer slots of every rank's buffer: the most gates any rank holds (>= 1)."""

    @property
    def uniform(self) -> bool:
        """Every rank holds every layer in trace order and counts its own tokens: no remapping needed."""
        L = len(self.layers)
        return (
            self.width == L
            and bool((self.index == np.arange(L)).all())
            and bool((self.primary == np.arange(len(self.primary))).all())
        )

    @property
    def names(self) -> list[str]:
        return [d["name"] for d in self.layers]

    def owners(self) -> dict[str, list[int]]:
        """{layer name: ranks whose counts are summed into it} (replica ranks left out)."""
        counted = self.primary == np.arange(len(self.primary))
        return {
            d["name"]: [int(r) for r in np.flatnonzero((self.index[:, li] >= 0) & counted)]
            for li, d in enumerate(self.layers)
        }

    def replicas(self) -> dict[int, int]:
        """{replica rank: its primary} for ranks whose counts are left out."""
        return {int(r): int(p) for r, p in enumerate(self.primary) if r != p}

    def local_slots(self, rank: int) -> list[int]:
        """[L_local] global layer index of each of `rank`'s buffer slots, in slot order."""
        held = np.flatnonzero(self.index[rank] >= 0)
        return [int(li) for li in held[np.argsort(self.index[rank, held])]]


def describe(
    name: str, num_experts: int, top_k: int, kind: str, *, expert_to_rank: Sequence[int] | None = None, **more: Any
) -> dict[str, Any]:
    """One layer's declaration: the LAYER_KEYS that must agree across ranks, plus free-form fields."""
    return {
        "name": name,
        "num_experts": int(num_experts),
        "top_k": int(top_k),
        "kind": kind,
        "expert_to_rank": None if expert_to_rank is None else [int(r) for r in expert_to_rank],
        **more,
    }


def _natural(name: str) -> tuple:
    """Sort key putting 'layers.10' after 'layers.9'."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p)


def _shown(values: dict[int, Any]) -> str:
    return ", ".join(f"rank {r}: {v!r}" for r, v in list(values.items())[:4]) + (", ..." if len(values) > 4 else "")


def reconcile(ranks: Sequence[dict[str, Any]]) -> RankLayout:
    """The RankLayout of every rank's declaration, or InputError naming what cannot be reconciled.

    ranks: [R] per rank (in group order) {"layers": [describe(...)], "replica_of": group rank of the rank
    whose tokens this rank's gates see again (tensor parallel without sequence parallel), or None,
    and the RUN_KEYS}. Trace order: the common order where every rank holds the same layers in the
    same order (data / expert parallel), else the union sorted by name with numbers compared as
    numbers (pipeline stages: `decoder.layers.9` before `decoder.layers.10`). A deterministic
    function of its input, so every rank reaches the same answer (or the same refusal).
    """
    R = len(ranks)
    for key in RUN_KEYS:
        seen = {r: d.get(key) for r, d in enumerate(ranks)}
        if len({repr(v) for v in seen.values()}) > 1:
            raise InputError(
                f"LoadTracer: {key} differs across ranks ({_shown(seen)}); every rank must trace with the same settings"
            )
    lists = [[d["name"] for d in rk["layers"]] for rk in ranks]
    for r, names in enumerate(lists):
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise InputError(f"LoadTracer: rank {r} holds two gates named {dup[0]!r}; layer names must be unique")
    if not any(lists):
        raise InputError(
            f"LoadTracer: none of the {R} ranks holds a gating module; pass gates=['*.router'] or "
            "gate_types=(MyRouter,) to trace a router of your own"
        )
    first: dict[str, tuple[int, dict[str, Any]]] = {}
    for r, rk in enumerate(ranks):
        for d in rk["layers"]:
            if d["name"] not in first:
                first[d["name"]] = (r, d)
                continue
            r0, d0 = first[d["name"]]
            for key in LAYER_KEYS:
                if d.get(key) != d0.get(key):
                    raise InputError(
                        f"LoadTracer: layer {d['name']!r} has {key} {d0.get(key)!r} on rank {r0} but "
                        f"{d.get(key)!r} on rank {r}; one layer must be the same gate on every rank"
                    )
    order = lists[0] if all(n == lists[0] for n in lists) else sorted(first, key=_natural)
    pos = {n: i for i, n in enumerate(order)}
    index = np.full((R, len(order)), -1, dtype=np.int64)
    for r, names in enumerate(lists):
        for slot, n in enumerate(names):
            index[r, pos[n]] = slot
    primary = np.arange(R, dtype=np.int64)
    for r, rk in enumerate(ranks):
        p = rk.get("replica_of")
        if p is None or p == r:
            continue
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < R:
            raise InputError(
                f"LoadTracer: rank {r} declares itself a replica of rank {p!r}, not a rank of the group (0..{R - 1})"
            )
        if ranks[p].get("replica_of") not in (None, p):
            raise InputError(
                f"LoadTracer: rank {r} is a replica of rank {p}, which is itself a replica; give every "
                "replica the first rank of its tensor-parallel group"
            )
        if lists[r] != lists[p]:
            raise InputError(
                f"LoadTracer: rank {r} is a tensor-parallel replica of rank {p} but holds other gates "
                f"({len(lists[r])} vs {len(lists[p])}); replicas must hold the same routers"
            )
        primary[r] = p
    width = max(1, max(len(n) for n in lists))
    return RankLayout([first[n][1] for n in order], index, primary, width)


def to_global(a: np.ndarray, lay: RankLayout) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """a: [S, R, P, width, W] gathered host block -> ([S, R, P, L, W] in global layer order, zero where a
    rank does not hold a layer or is a replica; mismatches). mismatches: (step index, replica rank,
    global layer) where a replica's counts differ from its primary's (its router did not see the same
    tokens: sequence parallel, or not a replica at all)."""
    S, R, P, _, W = a.shape
    L = len(lay.layers)
    out = np.zeros((S, R, P, L, W), dtype=a.dtype)
    for r in range(R):
        held = np.flatnonzero(lay.index[r] >= 0)
        if len(held):
            out[:, r][:, :, held] = a[:, r][:, :, lay.index[r, held]]  # out[:, r] is a view
    bad: list[tuple[int, int, int]] = []
    for r, p in lay.replicas().items():
        held = np.flatnonzero(lay.index[r] >= 0)
        diff = (out[:, r][:, :, held] != out[:, p][:, :, held]).any(axis=(1, 3))  # [S, held]
        bad += [(int(s), r, int(held[j])) for s, j in zip(*np.nonzero(diff))]
        out[:, r] = 0
    return out, bad


__all__ = ["LAYER_KEYS", "RUN_KEYS", "RankLayout", "describe", "reconcile", "to_global"]
