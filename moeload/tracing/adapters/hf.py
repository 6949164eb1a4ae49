"""Hugging Face transformers adapter: the router of every sparse-MoE block (Mixtral, Qwen2/3-MoE,
OLMoE, DeepSeek-V2/V3, GLM-4-MoE, GPT-OSS, Granite-MoE, Jamba, DBRX, ... and remote-code models
built the same way).

A gating module is the `gate` or `router` child of a transformers module that also holds
`experts`. Two output forms are read:
- transformers 5.x routers return a tuple holding top-k expert indices, e.g. `MixtralTopKRouter`
  -> `(router_logits [T, E], router_scores [T, k], router_indices [T, k])`: the integer tensor
  whose last dimension is k is taken as indices;
- transformers 4.x gates are an `nn.Linear` returning logits `[T, E]` and the block does the
  top-k (DBRX's router in 5.x as well): the adapter takes `topk(logits, k)` itself (softmax is
  monotonic, so this is the block's choice except for exact ties after rounding).
HF MoE blocks do not drop tokens: routed counts only. The logits go along for the NaN check. Integer
indices whose last dimension is not the discovered k (e.g. the router's `top_k` changed after the
tracer was made) raise RoutingShapeError rather than being replaced by a top-k of the logits.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor, nn

from moeload.tracing.adapters.base import Adapter, GateSpec, Routing, RoutingShapeError, module_paths

GATE_ATTRS = ("gate", "router")
EXPERT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOPK_ATTRS = ("top_k", "num_experts_per_tok", "moe_top_k", "topk")


def _int_attr(objs: list[Any], names: tuple[str, ...]) -> int | None:
    for o in objs:
        if o is None:
            continue
        for n in names:
            v = getattr(o, n, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def _num_experts(gate: nn.Module, block: nn.Module) -> int | None:
    n = _int_attr([gate, block, getattr(block, "config", None), getattr(gate, "config", None)], EXPERT_ATTRS)
    if n is not None:
        return n
    if isinstance(gate, nn.Linear):
        return gate.out_features
    w = getattr(gate, "weight", None)
    if isinstance(w, Tensor) and w.dim() == 2:
        return int(w.shape[0])
    lin = [m for m in gate.children() if isinstance(m, nn.Linear)]
    return lin[0].out_features if len(lin) == 1 else None


def _top_k(gate: nn.Module, block: nn.Module) -> int | None:
    return _int_attr([gate, block, getattr(gate, "config", None), getattr(block, "config", None)], TOPK_ATTRS)


def make_routing(num_experts: int, top_k: int):
    """counts(module, inputs, output) for one HF router: indices [T, k] from the output, or top-k of logits."""

    def routing(module: nn.Module, inputs: tuple, out: Any) -> Routing:
        items = out if isinstance(out, (tuple, list)) else (out,)
        tensors = [t for t in items if isinstance(t, Tensor)]
        logits = next(
            (t for t in tensors if t.is_floating_point() and t.dim() >= 2 and t.shape[-1] == num_experts), None
        )
        ints = [t for t in tensors if not t.is_floating_point() and t.dtype.is_signed and t.dim() >= 2]
        for t in ints:
            if t.shape[-1] == top_k:
                return Routing(indices=t.reshape(-1, top_k), probs=logits)
        if ints:
            raise RoutingShapeError(
                f"{type(module).__name__} returned expert indices of shape {tuple(ints[0].shape)}; "
                f"expected [tokens, {top_k}] (top_k when the tracer was made)"
            )
        if logits is not None:
            return Routing(indices=logits.reshape(-1, num_experts).topk(top_k, dim=-1).indices, probs=logits)
        raise RoutingShapeError(
            f"{type(module).__name__} output holds no [tokens, {top_k}] indices and no [tokens, {num_experts}] logits"
        )

    return routing


def _version() -> str | None:
    return getattr(sys.modules.get("transformers"), "__version__", None)


class HFAdapter(Adapter):
    """Finds the `gate` / `router` of every transformers module that holds `experts`."""

    name = "transformers"

    def describe(self) -> str:
        return "transformers MoE blocks (a `gate`/`router` next to `experts`)"

    def find(self, model: nn.Module) -> list[GateSpec]:
        if "transformers" not in sys.modules:
            return []
        paths = module_paths(model)
        out = []
        for block in model.modules():
            if not type(block).__module__.startswith("transformers") or not hasattr(block, "experts"):
                continue
            for attr in GATE_ATTRS:
                gate = getattr(block, attr, None)
                if not isinstance(gate, nn.Module) or id(gate) not in paths:
                    continue
                E, k = _num_experts(gate, block), _top_k(gate, block)
                if E is None or k is None or k > E:
                    continue
                out.append(
                    GateSpec(
                        module=gate,
                        name=paths[id(gate)],
                        num_experts=E,
                        top_k=k,
                        counts=make_routing(E, k),
                        framework="transformers",
                        framework_version=_version(),
                    )
                )
                break
        return out


ADAPTER: Adapter = HFAdapter()

__all__ = ["ADAPTER", "HFAdapter", "make_routing"]
