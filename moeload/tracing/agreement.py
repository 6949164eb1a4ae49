"""LoadTracer's layers across ranks: what each rank declares, the agreed RankLayout (a collective), the
manifest built from it, each layer's count kind, and expert->rank map changes (`record_rank_map`)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from moeload.errors import InputError, first_line
from moeload.trace import Manifest
from moeload.trace.layout import contiguous_expert_to_rank
from moeload.tracing.adapters import GateSpec
from moeload.tracing.collective import all_gather_object, tracer_group
from moeload.tracing.hooks import _logical_counts
from moeload.tracing.ranks import RankLayout, reconcile
from moeload.tracing.tracer_state import TracerState


class LayerAgreement(TracerState):
    """The part of LoadTracer that agrees on layers with the other ranks and records expert maps."""

    def _agree(self, declared: dict[str, Any], group: Any, tp_group: Any) -> RankLayout:
        """The RankLayout of every rank's `declared` gates (a collective where world_size > 1). InputError
        where they cannot be reconciled (on every rank alike); where the collective itself fails, this
        rank's own layout, with tracing stopped (training goes on)."""
        if self.world_size == 1:
            return reconcile([declared])
        if tp_group is None:
            tp_group = _megatron_tp_group(self.specs)
        if tp_group is not None:
            declared["replica_of"] = _replica_of(tp_group, group, self.rank)
        self._cpu_pg = tracer_group(group, self.flush_timeout)
        try:
            every = all_gather_object(declared, self._cpu_pg, self.world_size)
        except Exception as e:  # a dead or late peer: record nothing rather than something wrong
            reason = f"layer agreement failed: {type(e).__name__}: {first_line(e, 160)}"
            self.tracing_stopped = {"step": 0, "reason": reason}
            self.errors.append(f"tracing stopped at step 0: {reason}")
            warnings.warn(
                f"moeload: tracing stopped on rank {self.rank} before the first step ({reason}); training continues",
                RuntimeWarning,
                stacklevel=3,
            )
            return reconcile([declared])
        return reconcile(every)

    def _manifest(self, model_name: str, tokens_per_step: int | None, extra: dict[str, Any]) -> Manifest:
        descs = self.rank_layout.layers
        ep = max(d["ep_size"] for d in descs)
        maps = None
        if any(d["expert_to_rank"] is not None for d in descs):
            maps = [
                list(d["expert_to_rank"]) if d["expert_to_rank"] is not None else _contiguous(d["num_experts"], ep)
                for d in descs
            ]
            ep = max(ep, 1 + max(max(m) for m in maps))
        frameworks = sorted({d["framework"] for d in descs})
        fv = sorted({f"{d['framework']} {d['framework_version']}" for d in descs if d["framework_version"]})
        lay = self.rank_layout
        if not lay.uniform:
            extra = {
                **extra,
                "layer_owners": lay.owners(),
                **({"replica_ranks": {str(r): p for r, p in lay.replicas().items()}} if lay.replicas() else {}),
            }
        return Manifest(
            layers=self.layers,
            experts_per_layer=[d["num_experts"] for d in descs],
            top_k=[d["top_k"] for d in descs],
            framework="+".join(frameworks),
            framework_version=", ".join(fv) or None,
            model_name=model_name,
            tokens_per_step=tokens_per_step,
            world_size=self.world_size,
            ep_size=ep,
            expert_to_rank=maps,
            count_kind=self.count_kind,
            ranks_recorded=self.ranks_recorded,
            flush_every=self.flush_every,
            extra={
                **extra,
                "record_eval": self.record_eval,
                "gate_classes": sorted({d["gate_class"] for d in descs}),
                **({"layer_count_kinds": self.layer_count_kinds} if len(set(self.layer_count_kinds)) > 1 else {}),
            },
        )

    def record_rank_map(
        self, step: int, layer: int | str, expert_to_rank: Sequence[int], *, phy2log: Sequence[int] | None = None
    ) -> None:
        """Note that `layer`'s experts live on the ranks `expert_to_rank: [E]` from `step` on (the first
        step counted under the new map; call at a step boundary on every rank). The writer rank adds
        `{"step", "layer", "expert_to_rank"}` to the manifest's `rank_map_changes` at the next flush (or
        close); `Trace.gpu_loads()` then uses it. phy2log: [E] the logical expert behind each of the
        router's output columns, where a re-placement permuted the router's rows (moeload.act): counts
        are then reported per logical expert from the next forward on (None: the router's ids are
        logical ones). Raises InputError for a bad layer, step or map, or before `start()`."""
        if self._buf is None:
            raise InputError("record_rank_map before start() (or after close())")
        li = self.layers.index(layer) if isinstance(layer, str) and layer in self.layers else layer
        if isinstance(li, bool) or not isinstance(li, (int, np.integer)) or not 0 <= li < len(self.layers):
            raise InputError(
                f"record_rank_map: layer {layer!r} is not a traced layer (0..{len(self.layers) - 1} or a name)"
            )
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise InputError(f"record_rank_map: step must be an integer >= 0, got {step!r}")
        E, G = self.rank_layout.layers[li]["num_experts"], self.manifest.ep_size
        maps = {"expert_to_rank": expert_to_rank, "phy2log": phy2log}
        for name, m in maps.items():
            if m is None:
                continue
            a = np.asarray(m)
            if a.shape != (E,) or a.dtype.kind not in "iu":
                raise InputError(f"record_rank_map: {name} must be {E} integers, got {m!r}")
            if name == "expert_to_rank" and not ((a >= 0) & (a < G)).all():
                raise InputError(f"record_rank_map: expert_to_rank holds ranks outside [0, ep_size={G}): {a.tolist()}")
            if name == "phy2log" and sorted(a.tolist()) != list(range(E)):
                raise InputError(f"record_rank_map: phy2log must be a permutation of 0..{E - 1}, got {a.tolist()}")
        slot = self._slot_of.get(int(li))
        if slot is not None:  # a gate this rank holds: count logical experts from the next forward on
            spec = self.specs[slot]
            own = self._gate_counts.setdefault(slot, spec.counts)
            p2l = list(range(E)) if phy2log is None else [int(x) for x in phy2log]
            spec.counts = own if p2l == list(range(E)) else _logical_counts(own, p2l, self.device)
        self.manifest.rank_map_changes.append(
            {"step": int(step), "layer": int(li), "expert_to_rank": [int(r) for r in expert_to_rank]}
        )


def layer_count_kinds(specs: Sequence[GateSpec], kept: bool | str = True) -> list[str]:
    """[L] what the trace holds for each gate: "kept" (its routing is taken after capacity dropping,
    `GateSpec.count_kind == "kept"`; whatever `kept` says, since that is all it shows), "both" (routed
    and kept: the gate reports drops and kept=True, or kept="always") or "routed"."""
    out = []
    for s in specs:
        kind = s.count_kind or "routed"
        if kind not in ("routed", "kept"):
            raise ValueError(f"GateSpec {s.name!r}: count_kind={kind!r}, expected None, 'routed' or 'kept'")
        if kind == "routed" and (kept == "always" or (bool(kept) and s.has_kept)):
            kind = "both"
        out.append(kind)
    return out


def trace_count_kind(kinds: Sequence[str]) -> str:
    """The manifest's `count_kind` for per-layer kinds: the common kind, or "both" where layers differ."""
    return kinds[0] if len(set(kinds)) == 1 else "both"


def _contiguous(num_experts: int, ep_size: int) -> list[int]:
    """The contiguous expert -> rank map (its one home: moeload.trace.layout)."""
    return contiguous_expert_to_rank(num_experts, ep_size)


def _replica_of(tp_group: Any, group: Any, rank: int) -> int | None:
    """This rank's primary in `group` numbering: the first rank of `tp_group` (None where that is this rank)."""
    dist = torch.distributed
    first = dist.get_process_group_ranks(tp_group)[0]
    p = first if group is None else dist.get_group_rank(group, first)
    return None if p == rank else int(p)


def _megatron_tp_group(specs: Sequence[GateSpec]) -> Any:
    """megatron-core's tensor-parallel group where its routers are replicated (TP > 1 without sequence
    parallel: every TP rank routes the same tokens), else None."""
    cfgs = [getattr(s.module, "config", None) for s in specs if s.framework == "megatron-core"]
    if not cfgs or any(getattr(c, "sequence_parallel", False) for c in cfgs):
        return None
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
            return ps.get_tensor_model_parallel_group()
    except Exception:  # not initialised the usual way: the caller can pass tp_group=
        return None
    return None
