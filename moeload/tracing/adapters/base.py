"""The adapter interface: how the tracer finds gating modules and reads one forward's routing.

An `Adapter` looks at a model and returns one `GateSpec` per gating (router) module it recognises.
The spec's `counts(module, inputs, output)` turns the output of one forward of that module into a
`Routing` (or a bare tensor, see `Routing`); the tracer does all accumulation itself, on the
device, without host syncs. Adapters for optional frameworks must not import the framework unless
it is already imported (`sys.modules`): a model cannot hold a framework's modules otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from torch import Tensor, nn


class Routing(NamedTuple):
    """What one forward of a gate routed, in one of three forms (set exactly one group).

    - top-k: `indices: [T, k]` integer expert ids, -1 = no expert (dropped, not counted as any
      expert's load); optional `kept: [T, k]` bool, False where capacity dropped the route.
    - map: `mask: [T, E]` bool or 0/1, True where token t is routed to expert e; optional
      `kept_mask: [T, E]`.
    - counts: `counts: [E]` routed tokens per expert, precomputed (e.g. DeepSpeed `exp_counts`);
      optional `kept_counts: [E]`, or `kept_ids` (the kept routes' expert ids, -1 = dropped), or
      `capacity` (kept = min(counts, capacity) per expert).
    `tokens`: tokens that reached the gate (int or [] tensor); inferred as T for top-k and map
    forms, and as `counts.sum() // top_k` for the counts form. Where no kept information is given,
    kept = routed. `probs`: optional, any shape: the router's probabilities or logits, or a value
    computed from all of them (e.g. its aux loss); a NaN in it is flagged on the device (no host
    sync) and disables the layer when its block is flushed. A bare tensor returned by
    `GateSpec.counts` is read as: 1-D -> counts, 2-D integer -> indices, 2-D bool or floating -> mask.
    """

    indices: Tensor | None = None
    kept: Tensor | None = None
    mask: Tensor | None = None
    kept_mask: Tensor | None = None
    counts: Tensor | None = None
    kept_counts: Tensor | None = None
    tokens: int | Tensor | None = None
    probs: Tensor | None = None
    kept_ids: Tensor | None = None
    """Counts form only, instead of `kept_counts`: the kept routes as integer expert ids (any shape,
    -1 = dropped by capacity, e.g. DeepSpeed's sparse routes), binned on the device by the tracer."""
    capacity: int | None = None
    """Counts form only, instead of `kept_counts` / `kept_ids`: a host int C such that the gate kept
    exactly min(counts[e], C) routes of each expert e. Set it only where that is exact: the gate gives
    each expert's routes distinct positions 0..counts[e]-1 (or keeps the top C of a 0/1 mask) and keeps
    the positions < C (DeepSpeed top-2, top-1 without RTS). The tracer then adds both rows in two
    kernels (a `minimum` against cached caps and one `add_`)."""


class RoutingShapeError(ValueError):
    """A gate's output does not have the shape or form its adapter expects (e.g. a framework version
    that changed its router's outputs); the tracer disables that layer with reason "unexpected router
    output shape"."""


CountsFn = Callable[["nn.Module", tuple, Any], "Routing | Tensor"]


@dataclasses.dataclass
class GateSpec:
    """One gating module and how to read it.

    module: the module whose forward hook is installed; name: its module path in the model (the
    layer name in the trace); num_experts, top_k: of this gate; counts(module, inputs, output)
    -> Routing | Tensor for one forward; has_kept: the routing carries capacity-drop information;
    framework / framework_version: e.g. ("deepspeed", "0.19.8"); expert_to_rank: [E] expert-
    parallel rank holding each expert, where known; ep_size / ep_rank: expert-parallel group size
    and this process's rank in it (1 / 0 without expert parallelism); count_kind: what the
    routing's main counts (`indices` / `mask` / `counts`) are: "routed" (router decisions before
    capacity dropping; None means this) or "kept" (the gate's output is taken after dropping, e.g.
    megatron-core with a capacity factor; the trace then labels the layer's counts as kept).
    """

    module: nn.Module
    name: str
    num_experts: int
    top_k: int
    counts: CountsFn
    has_kept: bool = False
    framework: str = "torch"
    framework_version: str | None = None
    expert_to_rank: Sequence[int] | None = None
    ep_size: int = 1
    ep_rank: int = 0
    count_kind: str | None = None
    bias: Callable[[], Tensor | None] | None = None
    """Reads the router's expert-bias vector [E] (aux-loss-free routing, DeepSeek-V3 style) as it is
    now, or None while it has none; None: the router has no bias (`find_bias` fills it in)."""
    ids_in_range: bool = False
    """The gate's top-k indices are int64 ids in [0, num_experts) by construction (a `topk` over its E
    scores, no -1 for dropped routes): the tracer adds them without binning them first (one kernel
    per row instead of two). Set it only where that holds: an id out of range would fail the hook on
    CPU and trip a device-side assert on CUDA."""

    def __post_init__(self) -> None:
        if self.count_kind not in (None, "routed", "kept"):
            raise ValueError(
                f"GateSpec {self.name!r}: count_kind={self.count_kind!r}, expected None, 'routed' or 'kept'"
            )
        if self.num_experts < 1 or self.top_k < 1:
            raise ValueError(f"GateSpec {self.name!r}: num_experts={self.num_experts}, top_k={self.top_k} must be >= 1")
        if self.expert_to_rank is not None:
            self.expert_to_rank = [int(r) for r in self.expert_to_rank]
            if len(self.expert_to_rank) != self.num_experts:
                raise ValueError(
                    f"GateSpec {self.name!r}: expert_to_rank has {len(self.expert_to_rank)} entries "
                    f"for {self.num_experts} experts"
                )


class Adapter:
    """Finds the gating modules of one framework. Subclasses set `name` and implement `find`."""

    name: str = "adapter"

    def find(self, model: nn.Module) -> list[GateSpec]:
        """One GateSpec per gating module of `model` that this adapter recognises (may be empty)."""
        raise NotImplementedError

    def describe(self) -> str:
        """What this adapter looks for, in a few words (used in NoGatingModulesError)."""
        return self.name


BIAS_NAMES = ("expert_bias", "expert_bias_E", "e_score_correction_bias")
"""Attributes holding a router's expert-bias vector: megatron-core `TopKRouter.expert_bias`
(moe_router_enable_expert_bias), torchtitan `MoE.expert_bias` / `expert_bias_E` (0.3; on the router's parent), transformers
DeepSeek-V3 / GLM-4-MoE `e_score_correction_bias` (on the gate)."""


def find_bias(gate: nn.Module, parent: nn.Module | None, num_experts: int) -> Callable[[], Tensor | None] | None:
    """A reader of the expert bias of `gate` (looked up on the gate, then its parent, by BIAS_NAMES; a
    tensor of num_experts elements), re-read at every call since frameworks may replace the buffer;
    None where neither has one."""
    from torch import Tensor

    for owner in (gate, parent):
        if owner is None:
            continue
        for name in BIAS_NAMES:
            v = getattr(owner, name, None)
            if isinstance(v, Tensor) and v.numel() == num_experts and v.is_floating_point():

                def read(owner: nn.Module = owner, name: str = name) -> Tensor | None:
                    t = getattr(owner, name, None)
                    return t if isinstance(t, Tensor) and t.numel() == num_experts else None

                return read
    return None


def module_paths(model: nn.Module) -> dict[int, str]:
    """id(module) -> module path in `model` ("" for the model itself), first path wins."""
    out: dict[int, str] = {}
    for name, m in model.named_modules():
        out.setdefault(id(m), name)
    return out


__all__ = ["BIAS_NAMES", "Adapter", "CountsFn", "GateSpec", "Routing", "RoutingShapeError", "find_bias", "module_paths"]
