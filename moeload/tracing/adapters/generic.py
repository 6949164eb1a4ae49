"""Generic adapter: any module whose output holds top-k expert indices or a [tokens, experts] routing map.

Modules are selected by module-path pattern (`fnmatch`, e.g. "*.router", "blocks.*.gate") or by
type. The output may be a tensor, a tuple / list / NamedTuple, a dict, a dataclass or any object
with attributes, or a `Routing`. Fields are looked up by name first (INDEX_NAMES, KEPT_NAMES,
MASK_NAMES), then by kind: the first 2-D integer tensor is read as indices [T, k], else the first
2-D bool tensor with E columns as a routing map [T, E]. A floating field named in PROB_NAMES goes
along as `Routing.probs` for the NaN check.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from moeload.errors import InputError
from moeload.tracing.adapters.base import Adapter, GateSpec, Routing, RoutingShapeError

INDEX_NAMES = ("indices", "topk_idx", "topk_indices", "top_k_index", "expert_indices", "selected_experts", "expert_index")
KEPT_NAMES = ("kept", "keep", "kept_mask")
MASK_NAMES = ("routing_map", "routing_mask", "dispatch_mask", "mask")
PROB_NAMES = ("probs", "router_probs", "scores", "router_scores", "logits", "router_logits", "gates", "weights",
              "aux_loss", "l_aux")
EXPERT_ATTRS = ("num_experts", "n_experts", "num_local_experts", "n_routed_experts", "num_routed_experts")
TOPK_ATTRS = ("top_k", "topk", "k", "num_experts_per_tok", "moe_router_topk", "router_topk")
GATE_CHILDREN = ("gate", "wg", "linear", "proj", "weight_proj")


def _fields(out: Any) -> dict[str, Any]:
    if isinstance(out, dict):
        return dict(out)
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return dict(zip(out._fields, out))
    if isinstance(out, (tuple, list)):
        return {str(i): v for i, v in enumerate(out)}
    if dataclasses.is_dataclass(out):
        return {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    return dict(getattr(out, "__dict__", {}))


def parse_output(out: Any, num_experts: int) -> Routing | Tensor:
    """One gate output -> Routing (indices [T, k] + kept, or mask [T, E]; probs where named);
    RoutingShapeError (a ValueError) if none is found."""
    if isinstance(out, (Routing, Tensor)):
        return out
    fields = {k: v for k, v in _fields(out).items() if isinstance(v, Tensor)}
    named = {k.lower(): v for k, v in fields.items()}
    kept = next((named[n] for n in KEPT_NAMES if n in named), None)
    probs = next((named[n] for n in PROB_NAMES if n in named and named[n].is_floating_point()), None)
    for n in INDEX_NAMES:
        if n in named:
            return Routing(indices=named[n], kept=kept, probs=probs)
    for n in MASK_NAMES:
        if n in named and named[n].dim() == 2 and named[n].shape[-1] == num_experts:
            return Routing(mask=named[n], probs=probs)
    for v in fields.values():
        if v.dim() == 2 and not v.is_floating_point() and v.dtype != torch.bool:
            return Routing(indices=v, kept=kept, probs=probs)
    for v in fields.values():
        if v.dim() == 2 and v.dtype == torch.bool and v.shape[-1] == num_experts:
            return Routing(mask=v, probs=probs)
    raise RoutingShapeError(
        f"gate output {type(out).__name__} holds no [tokens, k] integer expert indices "
        f"and no [tokens, {num_experts}] bool routing map"
    )


def infer_num_experts(module: nn.Module) -> int | None:
    """Experts of a gate from its attributes, or the out_features of its (child) linear layer."""
    for a in EXPERT_ATTRS:
        v = getattr(module, a, None)
        if isinstance(v, int) and v > 0:
            return v
    if isinstance(module, nn.Linear):
        return module.out_features
    for c in GATE_CHILDREN:
        child = getattr(module, c, None)
        if isinstance(child, nn.Linear):
            return child.out_features
    w = getattr(module, "weight", None)
    if isinstance(w, Tensor) and w.dim() == 2:
        return int(w.shape[0])
    return None


def infer_top_k(module: nn.Module) -> int | None:
    for a in TOPK_ATTRS:
        v = getattr(module, a, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


class GenericAdapter(Adapter):
    """Gates selected by module path pattern(s) and/or type(s).

    patterns: fnmatch patterns on module paths; types: module classes; num_experts / top_k:
    used where the module does not tell (attributes EXPERT_ATTRS / TOPK_ATTRS, or a linear gate);
    has_kept: the outputs carry a kept field (KEPT_NAMES), so the trace records kept counts too.
    """

    name = "generic"

    def __init__(
        self,
        patterns: Sequence[str] = (),
        types: Sequence[type] = (),
        *,
        num_experts: int | None = None,
        top_k: int | None = None,
        has_kept: bool = False,
        framework: str = "torch",
        framework_version: str | None = None,
    ) -> None:
        self.patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        self.types = tuple(types) if isinstance(types, (tuple, list)) else (types,)
        self.num_experts = num_experts
        self.top_k = top_k
        self.has_kept = has_kept
        self.framework = framework
        self.framework_version = framework_version or (torch.__version__ if framework == "torch" else None)

    def describe(self) -> str:
        what = [f"paths matching {self.patterns}"] if self.patterns else []
        what += [f"modules of type {[t.__name__ for t in self.types]}"] if self.types else []
        return "generic: " + (" or ".join(what) or "nothing (no patterns or types given)")

    def matches(self, name: str, module: nn.Module) -> bool:
        return bool(self.types and isinstance(module, self.types)) or any(
            fnmatch.fnmatchcase(name, p) for p in self.patterns
        )

    def find(self, model: nn.Module) -> list[GateSpec]:
        out = []
        for name, m in model.named_modules():
            if not self.matches(name, m):
                continue
            E = self.num_experts or infer_num_experts(m)
            k = self.top_k or infer_top_k(m)
            if E is None or k is None:
                missing = "num_experts" if E is None else "top_k"
                raise InputError(f"gate {name!r} ({type(m).__name__}): cannot tell its {missing}; pass {missing}=... to LoadTracer")

            def counts(module: nn.Module, inputs: tuple, output: Any, _E: int = E) -> Routing | Tensor:
                return parse_output(output, _E)

            out.append(
                GateSpec(
                    module=m, name=name, num_experts=E, top_k=k, counts=counts, has_kept=self.has_kept,
                    framework=self.framework, framework_version=self.framework_version,
                )
            )
        return out
