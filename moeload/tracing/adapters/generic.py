"""Generic adapter: any module whose output holds top-k expert indices, a [tokens, experts] routing map,
or router logits / probabilities [tokens, experts].

Modules are selected by module-path pattern (`fnmatch`, e.g. "*.router", "blocks.*.gate") or by
type. The output may be a tensor, a tuple / list / NamedTuple, a dict, a dataclass or any object
with attributes, or a `Routing`. Fields are looked up by name first (INDEX_NAMES, KEPT_NAMES,
MASK_NAMES), then by kind: the first 2-D integer tensor is read as indices [T, k], else the first
2-D bool tensor with E columns as a routing map [T, E]. A floating field named in PROB_NAMES goes
along as `Routing.probs` for the NaN check.

Floating outputs (the rule, decided from dtype, shape and field name only, never from values, so
no host sync): a floating tensor whose last dimension is E is read as scores (logits or
probabilities) and the tracer takes `topk(scores, top_k)` on the device, as a plain `nn.Linear`
gate needs; the exception is a floating field named in MASK_NAMES (e.g. "routing_map"), read as a
0/1 map. `gate_output` overrides the rule: "mask" reads every floating [.., E] output as a 0/1 map
(summed per expert), "logits" reads every one as scores. With scores, top_k must be known (gate
attribute or `top_k=`): otherwise `find` raises InputError naming the gate. Where softmax or
sigmoid is applied after the gate, top-k of the logits is the same choice (monotonic), up to exact
ties; a router that adds a bias before top-k (DeepSeek-V3 style) must expose its indices instead.
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

INDEX_NAMES = (
    "indices",
    "topk_idx",
    "topk_indices",
    "top_k_index",
    "expert_indices",
    "selected_experts",
    "expert_index",
)
KEPT_NAMES = ("kept", "keep", "kept_mask")
MASK_NAMES = ("routing_map", "routing_mask", "dispatch_mask", "mask")
PROB_NAMES = (
    "probs",
    "router_probs",
    "scores",
    "router_scores",
    "logits",
    "router_logits",
    "gates",
    "weights",
    "aux_loss",
    "l_aux",
)
EXPERT_ATTRS = ("num_experts", "n_experts", "num_local_experts", "n_routed_experts", "num_routed_experts")
TOPK_ATTRS = ("top_k", "topk", "k", "num_experts_per_tok", "moe_router_topk", "router_topk")
GATE_CHILDREN = ("gate", "wg", "linear", "proj", "weight_proj")
GATE_OUTPUTS = ("auto", "logits", "mask")


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


def _scores(v: Tensor, num_experts: int, top_k: int, probs: Tensor | None) -> Routing:
    """Scores [.., E] -> Routing(indices=topk(scores, k) [T, k]) on the device; the scores go along for the NaN check."""
    if top_k > num_experts:
        raise RoutingShapeError(
            f"top_k={top_k} > {num_experts} experts: cannot take top-k of [tokens, {num_experts}] scores"
        )
    flat = v.reshape(-1, num_experts)
    return Routing(indices=flat.topk(top_k, dim=-1).indices, probs=v if probs is None else probs)


def _floating(
    v: Tensor, num_experts: int, top_k: int | None, gate_output: str, probs: Tensor | None, named_mask: bool = False
) -> Routing:
    """A floating [.., E] output -> scores (top-k) or 0/1 map, by the module rule (see the module docstring)."""
    if gate_output == "mask" or (gate_output == "auto" and named_mask):
        return Routing(mask=v.reshape(-1, num_experts), probs=probs)
    if top_k is None:
        raise RoutingShapeError(f"gate returns scores [tokens, {num_experts}] and top_k is unknown; pass top_k=")
    return _scores(v, num_experts, top_k, probs)


def parse_output(out: Any, num_experts: int, top_k: int | None = None, gate_output: str = "auto") -> Routing | Tensor:
    """One gate output -> Routing (indices [T, k] + kept; mask [T, E]; or top-k of scores [.., E], see the
    module docstring for the floating rule; probs where named); RoutingShapeError (a ValueError) if none."""
    if isinstance(out, Routing):
        return out
    if isinstance(out, Tensor):
        if out.is_floating_point() and out.dim() >= 2 and out.shape[-1] == num_experts:
            return _floating(out, num_experts, top_k, gate_output, None)
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
            if named[n].is_floating_point():
                return _floating(named[n], num_experts, top_k, gate_output, probs, named_mask=True)
            return Routing(mask=named[n], probs=probs)
    for v in fields.values():
        if v.dim() == 2 and not v.is_floating_point() and v.dtype != torch.bool:
            return Routing(indices=v, kept=kept, probs=probs)
    for v in fields.values():  # [batch, seq, k] indices (torchtitan 0.3): tokens are the leading dimensions
        if (
            v.dim() >= 3
            and not v.is_floating_point()
            and v.dtype != torch.bool
            and (top_k is None or v.shape[-1] == top_k)
        ):
            return Routing(
                indices=v.reshape(-1, v.shape[-1]), kept=None if kept is None else kept.reshape(-1), probs=probs
            )
    for v in fields.values():
        if v.dim() == 2 and v.dtype == torch.bool and v.shape[-1] == num_experts:
            return Routing(mask=v, probs=probs)
    named_scores = [named[n] for n in PROB_NAMES if n in named]
    for v in [*named_scores, *fields.values()]:
        if v.is_floating_point() and v.dim() >= 2 and v.shape[-1] == num_experts:
            return _floating(v, num_experts, top_k, gate_output, probs)
    raise RoutingShapeError(
        f"gate output {type(out).__name__} holds no [tokens, k] integer expert indices, "
        f"no [tokens, {num_experts}] bool routing map and no [tokens, {num_experts}] scores"
    )


def _signature(out: tuple) -> tuple:
    """What parse_output's choice for a tuple output depends on: its type (a NamedTuple's field names) and,
    per field, dtype and shape where it is a tensor (the shape holds more than the choice needs, its
    dimensions and last size, but is the cheaper to read)."""
    return (type(out), *[(v.dtype, v.shape) if isinstance(v, Tensor) else None for v in out])


class _TupleReader:
    """One gate's counts function: parse_output, remembered per tuple signature. A tuple (or NamedTuple)
    output whose fields parse_output returns as they are (indices, kept, probs; or mask, probs) is read at
    later forwards of the same signature by position, without parsing again; any other output is parsed."""

    def __init__(self, num_experts: int, top_k: int, gate_output: str) -> None:
        self.num_experts, self.top_k, self.gate_output = num_experts, top_k, gate_output
        self._plans: dict[tuple, tuple[bool, int, int | None, int | None]] = {}  # -> (mask?, main, kept, probs)

    def __call__(self, module: nn.Module, inputs: tuple, output: Any) -> Routing | Tensor:
        if not isinstance(output, tuple) or isinstance(output, Routing):  # a Routing is returned as it is
            return parse_output(output, self.num_experts, self.top_k, self.gate_output)
        sig = _signature(output)
        plan = self._plans.get(sig)
        if plan is not None:
            is_mask, main, kept, probs = plan
            p = None if probs is None else output[probs]
            if is_mask:
                return Routing(mask=output[main], probs=p)
            return Routing(indices=output[main], kept=None if kept is None else output[kept], probs=p)
        r = parse_output(output, self.num_experts, self.top_k, self.gate_output)
        if isinstance(r, Routing):
            plan = self._plan(output, r)
            if plan is not None:
                if len(self._plans) >= 64:
                    self._plans.clear()
                self._plans[sig] = plan
        return r

    @staticmethod
    def _plan(output: tuple, r: Routing) -> tuple[bool, int, int | None, int | None] | None:
        """Positions of the fields `r` holds as they are, or None where it holds a derived tensor."""

        def pos(v: Tensor | None) -> int | None:
            return next((i for i, f in enumerate(output) if f is v), None) if v is not None else None

        is_mask = r.mask is not None
        main = pos(r.mask if is_mask else r.indices)
        kept, probs = pos(r.kept), pos(r.probs)
        if main is None or (r.kept is not None and kept is None) or (r.probs is not None and probs is None):
            return None
        return is_mask, main, kept, probs


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
    has_kept: the outputs carry a kept field (KEPT_NAMES), so the trace records kept counts too;
    gate_output: "auto" | "logits" | "mask", how a floating [.., E] output is read (module docstring).
    """

    name = "generic"

    def __init__(
        self,
        patterns: Sequence[str] = (),
        types: Sequence[type] | type = (),
        *,
        num_experts: int | None = None,
        top_k: int | None = None,
        has_kept: bool = False,
        framework: str = "torch",
        framework_version: str | None = None,
        gate_output: str = "auto",
    ) -> None:
        if gate_output not in GATE_OUTPUTS:
            raise InputError(f"gate_output={gate_output!r}: expected 'auto', 'logits' or 'mask'")
        self.gate_output = gate_output
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
            if E is None:
                raise InputError(
                    f"gate {name!r} ({type(m).__name__}): cannot tell its num_experts; pass num_experts=... to LoadTracer"
                )
            if k is None:
                what = "returns logits [tokens, experts], so" if isinstance(m, nn.Linear) else "cannot tell its top_k;"
                raise InputError(
                    f"gate {name!r} ({type(m).__name__}) {what} the tracer needs top_k to count its "
                    "routes; pass top_k=... to LoadTracer"
                )
            if k > E:
                raise InputError(f"gate {name!r} ({type(m).__name__}): top_k={k} > num_experts={E}")

            counts = _TupleReader(E, k, self.gate_output)
            out.append(
                GateSpec(
                    module=m,
                    name=name,
                    num_experts=E,
                    top_k=k,
                    counts=counts,
                    has_kept=self.has_kept,
                    framework=self.framework,
                    framework_version=self.framework_version,
                )
            )
        return out
