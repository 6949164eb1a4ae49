"""Adapter registry: the adapters that auto-discovery tries, in order.

`discover(model)` asks every registered adapter for the gating modules it recognises; the first
adapter to claim a module wins. Built in: the embedded workload's `TopKRouter`, then the framework
adapters listed in `FRAMEWORK_ADAPTERS` (imported lazily; a missing file or framework is skipped).
The generic adapter (`GenericAdapter`) is not auto-discovered: it runs when the tracer is given
`gates=[...]` patterns or `gate_types=(...)`, ahead of the registry.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from moeload.errors import NoGatingModulesError
from moeload.tracing.adapters.base import Adapter, GateSpec, Routing, RoutingShapeError, module_paths
from moeload.tracing.adapters.generic import GenericAdapter
from moeload.tracing.adapters.workload import WorkloadAdapter

if TYPE_CHECKING:
    from torch import nn

# ---- framework adapters --------------------------------------------------------------------------
# One module per framework; each defines `ADAPTER: Adapter` at module level and imports its
# framework only inside `find` (and only if already in sys.modules). Listed in discovery order.
FRAMEWORK_ADAPTERS: tuple[str, ...] = (
    "moeload.tracing.adapters.deepspeed",
    "moeload.tracing.adapters.megatron",
    "moeload.tracing.adapters.hf",
    "moeload.tracing.adapters.torchtitan",
)
# ---------------------------------------------------------------------------------------------------

_REGISTRY: list[Adapter] = [WorkloadAdapter()]
_frameworks_loaded = False


def _load_frameworks() -> None:
    global _frameworks_loaded
    if _frameworks_loaded:
        return
    _frameworks_loaded = True
    for modname in FRAMEWORK_ADAPTERS:
        try:
            if importlib.util.find_spec(modname) is None:
                continue
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        except Exception as e:  # a broken adapter must not stop tracing of other frameworks
            warnings.warn(
                f"moeload: adapter module {modname} failed to import ({type(e).__name__}: {e}); skipped", stacklevel=2
            )
            continue
        adapter = getattr(mod, "ADAPTER", None)
        if isinstance(adapter, Adapter) and adapter not in _REGISTRY:
            _REGISTRY.append(adapter)


def register_adapter(adapter: Adapter, *, first: bool = False) -> Adapter:
    """Add `adapter` to auto-discovery (at the end, or tried first with `first=True`); returns it."""
    if not isinstance(adapter, Adapter):
        raise TypeError(f"register_adapter: expected an Adapter instance, got {type(adapter).__name__}")
    _load_frameworks()
    if adapter not in _REGISTRY:
        _REGISTRY.insert(0, adapter) if first else _REGISTRY.append(adapter)
    return adapter


def registered_adapters() -> list[Adapter]:
    """The adapters auto-discovery tries, in order."""
    _load_frameworks()
    return list(_REGISTRY)


def discover(model: nn.Module, adapters: Sequence[Adapter] | None = None) -> list[GateSpec]:
    """GateSpecs of every gating module in `model`, in module order; raises NoGatingModulesError if none.

    adapters: tried in order (default: `registered_adapters()`); the first to claim a module wins.
    """
    tried = registered_adapters() if adapters is None else list(adapters)
    order = module_paths(model)
    specs: dict[int, GateSpec] = {}
    for adapter in tried:
        for spec in adapter.find(model):
            specs.setdefault(id(spec.module), spec)
    if not specs:
        looked = "; ".join(a.describe() for a in tried) or "no adapters"
        raise NoGatingModulesError(
            f"model {type(model).__name__}: no MoE gating module found (looked for: {looked}); "
            "pass gates=['*.router'] or gate_types=(MyRouter,) to trace a router of your own"
        )
    pos = {mid: i for i, mid in enumerate(order)}
    return sorted(specs.values(), key=lambda s: pos.get(id(s.module), len(pos)))


__all__ = [
    "FRAMEWORK_ADAPTERS",
    "Adapter",
    "GateSpec",
    "GenericAdapter",
    "Routing",
    "RoutingShapeError",
    "WorkloadAdapter",
    "discover",
    "register_adapter",
    "registered_adapters",
]
