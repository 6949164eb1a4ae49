"""Checkpoints across re-placements: the expert->rank map of every MoE layer, saved beside the model
and optimizer state, and applied before they are loaded.

After `permute_experts`, slot p of a layer holds logical expert `phy2log(map)[p]`. The model's and the
optimizer's state dicts are by slot (and so are DeepSpeed's `layer_{i}_expert_{p}` files); they do not say
which expert sits where. Save the map with them and apply it before loading::

    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "layout": layout_state_dict(model)}, f"ckpt/rank{rank}.pt")    # each rank its own file

    ck = torch.load(f"ckpt/rank{rank}.pt")
    apply_layout(model, ck["layout"], opt)     # collective: every plain MoE layer to the saved map
    model.load_state_dict(ck["model"]); opt.load_state_dict(ck["optimizer"])
    apply_layout(model, "contiguous", opt)     # optional, collective: back to the contiguous layout

Loading a permuted checkpoint without its map also gives a model that computes the same function
(gate rows and experts are both by slot), but logical expert e is then wherever slot e was: the
tracer's counts, `expert_to_rank` and any plan refer to the wrong experts.

A replica layer (`ReplicaGate` / `ReplicaRouter`, S slots for E experts) carries its slot map in its own
state_dict (the router's extra state), so load_state_dict restores it. In a model that mixes replica and
plain layers, the layout notes each replica layer as such ({"backend", "ep_size", "replicas": {"num_experts",
"num_slots"}}) and `apply_layout` moves only the plain layers, after checking that the model's replica layers
are the layout's. A model of replica layers only has no layout: both functions refuse it.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from moeload.act import _backends as bk
from moeload.act._slots import SlotMap, initial_slots
from moeload.act.permute import check_expert_to_rank, contiguous_expert_to_rank, phy2log
from moeload.act.slot_plan import record_slots
from moeload.errors import InputError

FORMAT, VERSION = "moeload-expert-layout", 1


def _slot_map(b: str, m: Any) -> SlotMap | None:
    """The layer's replica router (a SlotMap), or None for a plain layer."""
    g = bk.gate(b, m)
    return g if isinstance(g, SlotMap) else None


def _entry(b: str, m: Any) -> dict[str, Any]:
    """One layer's entry of a layout: its map in force, or for a replica layer its sizes."""
    g, out = _slot_map(b, m), {"backend": b, "ep_size": bk.ep_size(b, m)}
    if g is not None:
        return {**out, "replicas": {"num_experts": g.num_logical, "num_slots": g.num_slots}}
    return {**out, "expert_to_rank": bk.backend(b).expert_to_rank(m)}


def _moe_layers(model: Any, fn: str) -> list[tuple[str, str, Any]]:
    """The model's MoE layers; InputError where it has none, or only replica layers (which need no layout)."""
    layers = bk.moe_layers(model)
    if not layers:
        raise InputError(f"{fn}: {type(model).__name__} has no DeepSpeed MoE or megatron-core MoELayer layer")
    if all(_slot_map(b, m) is not None for _, b, m in layers):
        raise InputError(
            f"{fn}: every MoE layer of {type(model).__name__} is a replica layer, which has no expert->rank "
            "layout; its slot map is in its state_dict, so load_state_dict restores it without a layout"
        )
    return layers


def layout_state_dict(model: Any) -> dict[str, Any]:
    """The maps in force, to save beside the model's and optimizer's state (each rank its own copy):
    {"format", "version", "layers": {module path: {"backend", "ep_size", "expert_to_rank": [E]}}}; a replica
    layer's entry holds "replicas": {"num_experts", "num_slots"} instead of a map (its slot map is in the
    model's state_dict). Plain lists and strings: it fits in torch.save and JSON. InputError where the model
    has no MoE layer of a supported backend, or only replica layers."""
    layers = _moe_layers(model, "layout_state_dict")
    return {"format": FORMAT, "version": VERSION, "layers": {name: _entry(b, m) for name, b, m in layers}}


def _kind(replicas: Any) -> str:
    if replicas is None:
        return "a plain layer"
    if isinstance(replicas, dict):
        return f"a replica layer ({replicas.get('num_experts')} experts in {replicas.get('num_slots')} slots)"
    return f"a replica layer ({replicas!r:.40})"


def _targets(layers: list[tuple[str, str, Any]], layout: Any) -> dict[str, list[int]]:
    """The map each plain layer goes to (rank-local checks only): {module path: [E]}; replica layers are
    checked against the layout's entries and left out."""
    plain = [(name, b, m) for name, b, m in layers if _slot_map(b, m) is None]
    if isinstance(layout, str) and layout == "contiguous":
        return {
            name: contiguous_expert_to_rank(len(bk.backend(b).expert_to_rank(m)), bk.ep_size(b, m)).tolist()
            for name, b, m in plain
        }
    if not isinstance(layout, dict) or layout.get("format") != FORMAT:
        raise InputError(f"layout: expected 'contiguous' or a layout_state_dict() ({FORMAT!r}), got {layout!r:.80}")
    if layout.get("version") != VERSION:
        raise InputError(f"layout: version {layout.get('version')!r}, this moeload reads version {VERSION}")
    saved = layout.get("layers")
    if not isinstance(saved, dict):
        raise InputError("layout: 'layers' is not a dict")
    names = [name for name, _, _ in layers]
    missing, extra = [n for n in names if n not in saved], [n for n in saved if n not in names]
    if missing or extra:
        raise InputError(
            f"layout: its layers do not match the model's (not saved: {missing[:3]}, not in the model: "
            f"{extra[:3]}); save and load the same kind of object (the engine or its module)"
        )
    out = {}
    for name, b, m in layers:
        entry, G = saved[name], bk.ep_size(b, m)
        if not isinstance(entry, dict) or entry.get("backend") != b or entry.get("ep_size") != G:
            got = (entry.get("backend"), entry.get("ep_size")) if isinstance(entry, dict) else entry
            raise InputError(
                f"layout: layer {name!r} was saved as {got!r}; the model's is ({b!r}, {G}) (backend, ep_size)"
            )
        want, have = entry.get("replicas"), _entry(b, m).get("replicas")
        if want != have:
            raise InputError(
                f"layout: layer {name!r} was saved as {_kind(want)}, the model's is {_kind(have)}; "
                "build the model as the checkpoint's was (enable_replicas on the same layers, with the same sizes)"
            )
        if have is None:
            E = len(bk.backend(b).expert_to_rank(m))
            out[name] = check_expert_to_rank(entry.get("expert_to_rank"), E, G, f"layout[{name!r}]").tolist()
    return out


def apply_layout(model: Any, layout: Any, optimizer: Any = None, *, group: Any = None) -> dict[str, dict]:
    """Move every plain MoE layer of `model` to the maps of `layout` (collective over `group`, default the
    world: every rank calls it, at a step boundary).

    layout: a `layout_state_dict()` (this rank's saved copy), or "contiguous"; optimizer: the torch
    optimizer or DeepSpeed engine whose state moves with the experts (see the backends'
    `permute_experts`). Before loading a checkpoint, call it with the checkpoint's layout: the layers'
    slots then hold the experts the saved state dicts hold there. After loading, "contiguous" moves the
    experts, their optimizer state and the router rows back to the contiguous layout.
    Replica layers do not move (load_state_dict installs their slot maps); a layout must call them replica
    layers of the model's sizes, and the model's plain layers plain ones.
    Everything is checked before any expert moves: a layout that does not fit the model, or ranks of
    one expert-parallel group given different maps (files of different checkpoints), raise InputError
    on every rank of `group`. -> {module path: permute_experts' stats} for the plain layers (a layer
    already in its map moves nothing).
    """
    layers, error, targets = bk.moe_layers(model), "", {}
    try:
        _moe_layers(model, "apply_layout")
        targets = _targets(layers, layout)
    except InputError as e:
        error = str(e)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        keyed = {}
        if not error:  # a layer is known by its path and its EP group's global ranks (pipeline stages may repeat paths)
            for name, b, m in layers:
                if name not in targets:
                    continue
                g = bk.ep_group(b, m)
                keyed[name, tuple(dist.get_process_group_ranks(g)) if g is not None else ()] = targets[name]
        every: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, (error, keyed), group=group)
        if not error:
            errs = [f"rank {r}: {err}" for r, (err, _) in enumerate(every) if err]
            seen: dict = {}
            for r, (_, k) in enumerate(every):
                for key, m in k.items():
                    if seen.setdefault(key, (r, m))[1] != m:
                        errs.append(
                            f"layout: ranks {seen[key][0]} and {r} were given different maps for layer "
                            f"{key[0]!r} ({seen[key][1]} and {m}); load every rank's file of one checkpoint"
                        )
            error = errs[0] if errs else ""
    if error:
        raise InputError(error)
    return {
        name: bk.backend(b).permute_experts(m, targets[name], optimizer) for name, b, m in layers if name in targets
    }


def record_layout(tracer: Any, model: Any) -> list[str]:
    """Tell a `LoadTracer` started on a model that was re-placed before it (a run resumed from a
    checkpoint, after `apply_layout` or, for replica layers, `load_state_dict`) the maps in force:
    `tracer.record_rank_map(tracer.step_count, layer, map, phy2log=...)` for each traced gate whose layer
    is not in the contiguous layout, so that its counts are per logical expert and `Trace.gpu_loads()`
    follows the map from this step on. A replica layer (`ReplicaGate` / `ReplicaRouter`) whose slot map
    is not the initial one is recorded as the `Replacer` records it (`slot_plan.record_slots`: primary
    ranks, and the slot map for `replica_gpu_loads`); its counts are logical already.
    Call it on every rank after `tracer.start()` (and `tracer.load_state_dict`, where steps continue),
    before the next forward. -> the trace's layer names recorded."""
    owners = {id(bk.gate(b, m)): (b, m) for _, b, m in bk.moe_layers(model)}
    done = []
    for name, spec in zip(tracer.local_layers, tracer.specs):
        if id(spec.module) not in owners:
            continue
        b, m = owners[id(spec.module)]
        g = spec.module
        if isinstance(g, SlotMap):
            if list(g.slot_expert) != initial_slots(g.num_logical, g.num_slots, g.ep_size):
                record_slots(tracer, tracer.step_count, name, list(g.slot_expert), g.num_logical, g.ep_size)
                done.append(name)
            continue
        e2r = bk.backend(b).expert_to_rank(m)
        if e2r != contiguous_expert_to_rank(len(e2r), bk.ep_size(b, m)).tolist():
            tracer.record_rank_map(tracer.step_count, name, e2r, phy2log=phy2log(e2r).tolist())
            done.append(name)
    return done
