"""torchtitan adapter: the `TokenChoiceTopKRouter` of every torchtitan `MoE` (the `router` child).

torchtitan 0.3.0 (`torchtitan.models.common.moe`): `router(x [B, L, D], expert_bias [E] | None)`
returns `(top_scores [B, L, k], selected_experts_indices [B, L, k], scores [B, L, E])`; the indices
are read (reshaped to [T, k]), and the scores go along for the NaN check. Earlier versions
(`torchtitan.models.moe`) returned `(top_scores [T, k], selected_experts_indices [T, k],
num_tokens_per_expert [E])`: there the precomputed counts [E] are read. Both are the router's final
choice (expert bias, node-limited routing and `_debug_force_load_balance` applied); torchtitan
drops no tokens, so counts are routed counts. num_experts and top_k are the router's own attributes.

Expert bias (aux-loss-free balancing, on by default: `MoE.load_balance_coeff`): the parent `MoE`'s
`expert_bias_E` buffer (0.3.0; `expert_bias` earlier), re-read at each snapshot; torchtitan updates it
in an optimizer step pre-hook, so the snapshot the tracer takes after `step()` is the bias the next
forward routes with. A `MoE` built with `load_balance_coeff=None` has none.

Parallel layouts: a DTensor output (TP/SP) is read as this rank's local shard. Expert-parallel
placement is not read (no `expert_to_rank`); torchtitan's pipeline stages keep the global keys of
`layers`, so layer names are global.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from torch import Tensor

from moeload.tracing.adapters.base import Adapter, GateSpec, Routing, RoutingShapeError, module_paths

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn

MOE_MODULES = ("torchtitan.models.common.moe", "torchtitan.models.moe.moe", "torchtitan.models.moe")
"""Where torchtitan versions define TokenChoiceTopKRouter (0.3.0 first)."""
BIAS_ATTRS = ("expert_bias_E", "expert_bias")


def _local(t: Any) -> Any:
    """A DTensor's local shard; anything else unchanged."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) and type(t).__name__ == "DTensor" else t


def make_routing(num_experts: int, top_k: int) -> Callable[[nn.Module, tuple, Any], Routing]:
    """counts(module, inputs, output) for one TokenChoiceTopKRouter: Routing(counts=[E]) where the
    output ends in num_tokens_per_expert [E] (before 0.3.0), else Routing(indices=[T, k])."""

    def routing(module: nn.Module, inputs: tuple, out: Any) -> Routing:
        items = [_local(t) for t in out] if isinstance(out, (tuple, list)) else []
        if len(items) < 3 or not all(isinstance(t, Tensor) for t in items[:3]):
            raise RoutingShapeError(
                f"{type(module).__name__} returned {type(out).__name__}; "
                "expected (top_scores, selected_experts_indices, scores or num_tokens_per_expert)"
            )
        scores, idx, third = items[0], items[1], items[2]
        if idx.is_floating_point() or idx.dim() < 2 or idx.shape[-1] != top_k:
            raise RoutingShapeError(
                f"{type(module).__name__} returned expert indices {idx.dtype} {tuple(idx.shape)}; "
                f"expected integer [..., {top_k}] (top_k when the tracer was made)"
            )
        if third.dim() == 1 and third.shape[0] == num_experts:
            return Routing(counts=third, tokens=idx.numel() // top_k, probs=scores)
        return Routing(indices=idx.reshape(-1, top_k), probs=third if third.is_floating_point() else scores)

    return routing


def bias_reader(moe: nn.Module | None, num_experts: int) -> Callable[[], Tensor | None] | None:
    """A reader of the MoE's expert bias [E] (BIAS_ATTRS), re-read at each call; None where the MoE has none."""
    if moe is None:
        return None
    owner: nn.Module = moe
    for name in BIAS_ATTRS:
        if isinstance(_local(getattr(owner, name, None)), Tensor):

            def read(owner: nn.Module = owner, name: str = name) -> Tensor | None:
                t = _local(getattr(owner, name, None))
                return t if isinstance(t, Tensor) and t.numel() == num_experts else None

            return read if read() is not None else None
    return None


def _version() -> str | None:
    v = getattr(sys.modules.get("torchtitan"), "__version__", None)
    if v is None:
        try:
            from importlib.metadata import version

            v = version("torchtitan")
        except Exception:
            v = None
    return v


class TorchtitanAdapter(Adapter):
    """Finds every torchtitan `TokenChoiceTopKRouter` (top-k expert indices per forward)."""

    name = "torchtitan"

    def describe(self) -> str:
        return "torchtitan TokenChoiceTopKRouter"

    def find(self, model: nn.Module) -> list[GateSpec]:
        if "torchtitan" not in sys.modules:
            return []
        classes = tuple(
            c for m in MOE_MODULES if (c := getattr(sys.modules.get(m), "TokenChoiceTopKRouter", None)) is not None
        )
        if not classes:
            return []
        paths = module_paths(model)
        parents = {id(getattr(m, "router", None)): m for m in model.modules() if hasattr(m, "router")}
        out = []
        for r in model.modules():
            if not isinstance(r, classes) or id(r) not in paths:
                continue
            E, k = int(r.num_experts), int(r.top_k)
            out.append(
                GateSpec(
                    module=r,
                    name=paths[id(r)],
                    num_experts=E,
                    top_k=k,
                    counts=make_routing(E, k),
                    framework="torchtitan",
                    framework_version=_version(),
                    count_kind="routed",
                    bias=bias_reader(parents.get(id(r)), E),
                )
            )
        return out


ADAPTER: Adapter = TorchtitanAdapter()

__all__ = ["ADAPTER", "TorchtitanAdapter", "bias_reader", "make_routing"]
