"""Plans for replica layers (`act.replicas.ReplicaGate`, `act.megatron_replicas.ReplicaRouter`) as slot maps,
the add / remove calls that reach one, and the GPU loads of a trace that follow them.

A replica layer has S slots over ep_size ranks (slot s on rank s // (S / ep_size)) and E logical experts;
its slot map `slot_expert: [S]` holds the logical expert of each slot, -1 for a free one. Slots of one rank
are interchangeable for the work they do, so a plan is read as what each rank holds (`per_rank`), and the
target slot map keeps every slot that already holds what its rank needs (`slot_target`). `slot_moves` turns
the change into `("add", expert, slot)` / `("remove", slot)` calls: adds into free slots first, then removals
of copies whose expert keeps another copy. A primary can move this way (a copy lands on the new rank, then the
old slot is removed), since the copies are identical. Pure functions over lists (no torch).

The trace's `rank_map_changes` hold one rank per expert ([E]), so a slot map with copies does not fit there:
the Replacer records each expert's primary rank there (what `Trace.gpu_loads()` charges all routes to) and the
slot map in the manifest's `extra[SLOT_CHANGES_KEY]`, which `replica_gpu_loads` reads to split the routes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moeload.errors import InputError

SLOT_CHANGES_KEY = "replica_slot_changes"  # manifest extra: [{"step", "layer", "slot_expert": [S]}]


def per_rank(row: Any, num_experts: int, num_slots: int, ep_size: int, where: str) -> list[list[int]]:
    """A plan row for one replica layer -> [ep_size] lists of the logical experts each rank holds.

    row: [S] a slot map or a placement's phy2log row (slot s on rank s // (S / ep_size); -1 free), or
    [E] an expert->rank map (one copy each). InputError where it does not fit, or leaves an expert without
    a slot."""
    a = np.asarray(row)
    E, S, G = num_experts, num_slots, ep_size
    if a.ndim != 1 or a.dtype.kind not in "iu" or len(a) not in (E, S):
        raise InputError(f"{where}: expected {S} slots (logical experts, -1 free) or {E} ranks, got {list(row)!r:.80}")
    if len(a) == S:
        if ((a < -1) | (a >= E)).any():
            raise InputError(f"{where}: slots must hold experts in [-1, {E}), got {a.tolist()}")
        out = [sorted(int(e) for e in a[r * (S // G) : (r + 1) * (S // G)] if e >= 0) for r in range(G)]
    else:
        if ((a < 0) | (a >= G)).any():
            raise InputError(f"{where}: ranks must be in [0, {G}), got {a.tolist()}")
        out = [[e for e in range(E) if a[e] == r] for r in range(G)]
        full = [r for r, x in enumerate(out) if len(x) > S // G]
        if full:
            raise InputError(f"{where}: rank {full[0]} would hold {len(out[full[0]])} experts in {S // G} slots")
    missing = sorted(set(range(E)) - {e for x in out for e in x})
    if missing:
        raise InputError(f"{where}: experts {missing} have no slot")
    return out


def slot_target(ranks: list[list[int]], current: list[int]) -> list[int]:
    """ranks: [G] experts each rank should hold (`per_rank`); current: [S] the slot map in force -> [S] the
    target slot map: on each rank, slots that hold a needed expert keep it; the rest of the needs fill the
    other slots in slot order; what is left is free (-1)."""
    S, G = len(current), len(ranks)
    Ls, out = S // G, list(current)
    for r, need in enumerate(ranks):
        left, slots = list(need), range(r * Ls, (r + 1) * Ls)
        open_ = []
        for s in slots:
            if current[s] >= 0 and current[s] in left:
                left.remove(current[s])
            else:
                open_.append(s)
        for s in open_:
            out[s] = left.pop(0) if left else -1
    return out


def slot_moves(current: list[int], target: list[int]) -> list[tuple]:
    """[S] slot map in force -> [S] target: the calls, in order: ("add", expert, slot) into a free slot,
    ("remove", slot) of a copy whose expert has another copy. Where every changing slot holds an expert's only
    copy (two sole copies trading ranks), one of them is copied through a slot that is free before and after
    (an extra add, removed once the expert has landed). InputError where no such slot is free."""
    state, pending = list(current), [s for s in range(len(current)) if current[s] != target[s]]
    ops: list[tuple] = []
    transits = 0
    while pending:
        done = [s for s in pending if state[s] == -1]
        for s in done:
            ops.append(("add", int(target[s]), s))
            state[s] = target[s]
        pending = [s for s in pending if s not in done]
        freed = []
        for s in pending:
            if state.count(state[s]) > 1:
                ops.append(("remove", s))
                state[s] = -1
                freed.append(s)
        pending = [s for s in pending if s not in freed or target[s] != -1]
        spare = [f for f in range(len(state)) if state[f] == -1]  # free now and in the target (not pending)
        if not done and not freed and spare and transits < len(state):
            ops.append(("add", int(state[pending[0]]), spare[0]))  # next round frees pending[0]
            state[spare[0]] = state[pending[0]]
            pending.append(spare[0])
            transits += 1
        elif not done and not freed:
            raise InputError(
                f"plan: slots {pending} each hold an expert's only copy and no free slot is left to copy it through; "
                "give the plan a free slot"
            )
    return ops


def cost_arrays(slot_expert: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """[S] slot map -> (phy2log [S], share [S]) for `advise` (`Setting.times`): each copy takes an even share
    of its expert's routes (the gates alternate between copies); a free slot gets expert 0 with share 0."""
    a = np.asarray(slot_expert, dtype=np.int64)
    n = np.bincount(a[a >= 0], minlength=int(a.max()) + 1)
    return np.where(a < 0, 0, a), np.where(a < 0, 0.0, 1.0 / np.maximum(n[np.maximum(a, 0)], 1))


def primary_ranks(slot_expert: list[int], num_experts: int, ep_size: int) -> list[int]:
    """[S] slot map -> [E] the EP rank of each expert's primary (its home slot where it holds it, else its
    first slot): what fits in the trace's `rank_map_changes`."""
    S, E = len(slot_expert), num_experts
    L, Ls = E // ep_size, S // ep_size
    out = []
    for e in range(E):
        slots = [s for s, x in enumerate(slot_expert) if x == e]
        home = e // L * Ls + e % L
        out.append((home if home in slots else min(slots)) // Ls)
    return out


def record_slots(
    tracer: Any, step: int, layer: int | str, slot_expert: list[int], num_experts: int, ep_size: int
) -> None:
    """Tell a `LoadTracer` that replica layer `layer` (trace index or name) holds `slot_expert: [S]` from `step`
    on: each expert's primary rank goes into `rank_map_changes` (`record_rank_map`), the slot map into the
    manifest's `extra[SLOT_CHANGES_KEY]` (what `replica_gpu_loads` reads)."""
    tracer.record_rank_map(step, layer, primary_ranks(slot_expert, num_experts, ep_size))
    li = tracer.layers.index(layer) if isinstance(layer, str) else int(layer)
    tracer.manifest.extra.setdefault(SLOT_CHANGES_KEY, []).append(
        {"step": int(step), "layer": li, "slot_expert": [int(x) for x in slot_expert]}
    )


def replica_gpu_loads(trace: Any, *, kind: str = "routed", split: str = "train") -> np.ndarray:
    """[S, L, G] tokens per expert-parallel rank at every step of `trace` (a `Trace`), with the routes of a
    replicated expert split between its copies (copy i of n, in the gates' order, gets c // n + (i < c % n) of
    the step's c routes) under the slot maps the Replacer recorded (manifest `extra.replica_slot_changes`);
    layers and steps without one are `trace.gpu_loads()`'s. The gates split per rank and forward, so a rank's
    load here can differ from the real one by up to one route per copy, rank and micro-batch."""
    out = np.array(trace.gpu_loads(kind=kind, split=split))
    changes = (trace.meta.get("extra") or {}).get(SLOT_CHANGES_KEY) or []
    if not changes:
        return out
    steps, c = np.asarray(trace.steps_of(split)), trace.counts(kind=kind, split=split)
    G = out.shape[-1]
    for li in sorted({int(x["layer"]) for x in changes}):
        mine = sorted((x for x in changes if int(x["layer"]) == li), key=lambda x: x["step"])
        starts = np.asarray([x["step"] for x in mine])
        which = np.searchsorted(starts, steps, side="right") - 1
        E = int(trace.experts_per_layer[li])
        for k in np.unique(which[which >= 0]):
            rows = np.flatnonzero(which == k)
            slot_expert = [int(x) for x in mine[k]["slot_expert"]]
            Ls = len(slot_expert) // G
            load = np.zeros((len(rows), G), dtype=np.int64)
            for e in range(E):
                copies = _order([s for s, x in enumerate(slot_expert) if x == e], e, E // G, Ls)
                n, ce = len(copies), c[rows, li, e].astype(np.int64)
                for i, s in enumerate(copies):
                    load[:, s // Ls] += ce // n + (i < ce % n)
            out[rows, li] = load
    return out


def _order(slots: list[int], expert: int, L: int, Ls: int) -> list[int]:
    """An expert's slots in the gates' order (`act._slots.SlotMap.copies`): home slot first, then by id."""
    home = expert // L * Ls + expert % L
    return sorted(slots, key=lambda s: (s != home, s))
